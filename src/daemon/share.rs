//! One frame's work shared with a helper thread: a crowded frame's regions and heads are
//! split between the stage's own thread and one scoped helper when the cores have room, so its
//! latency is not one thread's whole frame. The stage threads themselves are `pipeline`'s.

thread_local! {
    /// Whether the cores have room: no frame waits for the stage on this thread (`in_two` may
    /// share).
    static ROOM: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// A stage says, before each frame, whether another frame is already waiting for it or at the
/// pipeline's front (the source's queue): when one is, the cores are busy with the pipeline's
/// own threads and `in_two` keeps to one thread.
pub fn frame_waiting(waiting: bool) {
    ROOM.with(|c| c.set(!waiting));
}

/// `f` over `items`, in order, on two threads when there are enough items and cores and no
/// frame is waiting for this stage: the second half on a named helper thread scoped to the
/// call, the first on the caller's. One frame's regions and heads (head finding, the
/// verifier's and the classifier's crop paths) are shared this way, so a crowded frame is not
/// held up by one thread while the other core has nothing to do; the results come back in the
/// items' order, as from one thread. Under full load (frames queued) it costs a thread start
/// a call for nothing, so it does not split then.
pub fn in_two<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    /// Fewer items than this are not worth a thread's start.
    const MIN_ITEMS: usize = 4;
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from));
    if items.len() < MIN_ITEMS || cores < 2 || !ROOM.with(std::cell::Cell::get) {
        return items.iter().map(&f).collect();
    }
    let (first, second) = items.split_at(items.len() / 2);
    std::thread::scope(|s| {
        let name = format!("{}-half", std::thread::current().name().unwrap_or("frame"));
        let helper = std::thread::Builder::new()
            .name(name)
            .spawn_scoped(s, || second.iter().map(&f).collect::<Vec<R>>());
        let mut out: Vec<R> = first.iter().map(&f).collect();
        match helper.map(|h| h.join()) {
            Ok(Ok(rest)) => out.extend(rest),
            // No thread to be had (or it panicked): the second half on this one.
            _ => out.extend(second.iter().map(&f)),
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_two_keeps_the_order_of_a_plain_map_and_names_its_helper() {
        for n in [0, 1, 3, 4, 5, 17, 100] {
            let items: Vec<usize> = (0..n).collect();
            let f = |&i: &usize| {
                let name = std::thread::current().name().map(String::from);
                (i * i, name)
            };
            let out = std::thread::Builder::new()
                .name("segment-0".into())
                .spawn(move || in_two(&items, f))
                .unwrap()
                .join()
                .unwrap();
            let squares: Vec<usize> = out.iter().map(|(v, _)| *v).collect();
            assert_eq!(
                squares,
                (0..n).map(|i| i * i).collect::<Vec<_>>(),
                "{n} items"
            );
            let names: std::collections::BTreeSet<_> =
                out.iter().filter_map(|(_, name)| name.clone()).collect();
            let split = n >= 4 && std::thread::available_parallelism().map_or(1, usize::from) > 1;
            let want: Vec<&str> = if n == 0 {
                vec![]
            } else if split {
                vec!["segment-0", "segment-0-half"]
            } else {
                vec!["segment-0"]
            };
            assert_eq!(names.iter().map(String::as_str).collect::<Vec<_>>(), want);
        }
    }
}
