//! Whether a call may spread its work over rayon's threads.
//!
//! A caller that already keeps every core busy (one worker per core, each on
//! whole images) gains nothing from decoding in bands on other cores, and
//! pays for it: each band after the first entropy-decodes the rows above it
//! again to skip them. Such callers run their work inside [`on_one_core`].

use std::cell::Cell;

thread_local! {
    static ONE_CORE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with decoding and cropping done as one job at a time: JPEGs in
/// one pass, no parallel splits. Output is identical either way.
pub fn on_one_core<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ONE_CORE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(ONE_CORE.with(|c| c.replace(true)));
    f()
}

/// False inside [`on_one_core`].
pub(crate) fn may_fan_out() -> bool {
    !ONE_CORE.with(Cell::get)
}

/// The least number of items a parallel iterator hands to one job: all of
/// them inside [`on_one_core`], so the iterator is not split.
pub(crate) fn min_len() -> usize {
    if may_fan_out() {
        1
    } else {
        usize::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_is_restored_also_after_a_panic() {
        assert!(may_fan_out());
        on_one_core(|| {
            assert!(!may_fan_out());
            assert_eq!(min_len(), usize::MAX);
            on_one_core(|| assert!(!may_fan_out()));
            assert!(!may_fan_out());
        });
        assert!(may_fan_out() && min_len() == 1);
        let caught = std::panic::catch_unwind(|| on_one_core(|| panic!("inside")));
        assert!(caught.is_err());
        assert!(may_fan_out());
    }
}
