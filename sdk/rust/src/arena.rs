//! The global allocator of plugins built for `wasm32-unknown-unknown`: a bump
//! arena in static memory, falling back to the system allocator.
//!
//! Plugboard runs every event in a fresh instance, so a plugin's heap lives
//! for one call. The standard allocator on `wasm32-unknown-unknown` gets its
//! memory with `memory.grow` on the first allocation of every instance, and
//! growing costs the host two `mprotect` calls and fresh page faults per
//! event: in `cargo run --release -p plugboard-host --example bench` a small
//! flow took about 1.5 times as long per event with it as with this arena.
//! The arena lives in `.bss`, inside the module's initial memory, so an
//! ordinary event never grows memory at all.
//!
//! Allocation bumps a pointer. Freeing the newest block (and growing it in
//! place) gives the space back; other frees are no-ops, which costs nothing
//! because the instance is discarded after the event. Past [`ARENA_BYTES`]
//! requests go to [`std::alloc::System`], so a large event still works.
//!
//! Written here because no crate offers a bump arena in static memory with a
//! fallback as a `#[global_allocator]` for Wasm (`static-alloc` has no
//! fallback, `bumpalo` is not a global allocator, `talc` reclaims memory this
//! lifetime never needs).
//!
//! The arena is installed by the default `arena` feature, only when building
//! for `wasm32-unknown-unknown` (a single-threaded target); turn the feature
//! off to bring your own allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;

/// Bytes served from static memory before falling back to [`System`].
pub const ARENA_BYTES: usize = 256 * 1024;

/// Bump state over a region of `len` bytes starting at address `base`:
/// offsets only, so it is plain logic, tested natively. All zero when empty,
/// so the arena lands in `.bss` and adds nothing to the module's size.
#[derive(Debug, Default)]
pub struct Bump {
    /// First free offset.
    next: usize,
    /// One past the start of the newest live block (0: none), for freeing
    /// and growing it in place.
    last_plus_one: usize,
}

impl Bump {
    /// An empty arena.
    pub const fn new() -> Self {
        Bump {
            next: 0,
            last_plus_one: 0,
        }
    }

    /// Offset of a new block for `layout` in a region of `len` bytes at
    /// address `base`, or `None` when it does not fit.
    pub fn alloc(&mut self, base: usize, len: usize, layout: Layout) -> Option<usize> {
        let start = (base + self.next).checked_next_multiple_of(layout.align())? - base;
        let end = start.checked_add(layout.size())?;
        if end > len {
            return None;
        }
        self.next = end;
        self.last_plus_one = start + 1;
        Some(start)
    }

    /// Frees the block at `offset`; only the newest block gives space back.
    pub fn free(&mut self, offset: usize) {
        if self.last_plus_one == offset + 1 {
            self.next = offset;
            self.last_plus_one = 0;
        }
    }

    /// Resizes the block at `offset` in place if it is the newest and the new
    /// size fits in `len`; returns whether it did.
    pub fn resize(&mut self, len: usize, offset: usize, new_size: usize) -> bool {
        match offset.checked_add(new_size) {
            Some(end) if self.last_plus_one == offset + 1 && end <= len => {
                self.next = end;
                true
            }
            _ => false,
        }
    }
}

#[repr(C, align(16))]
struct Region(UnsafeCell<[u8; ARENA_BYTES]>);

/// The arena as a [`GlobalAlloc`].
pub struct EventArena {
    region: Region,
    bump: UnsafeCell<Bump>,
}

// SAFETY: Wasm without the `atomics` feature has exactly one thread; the
// native unit tests use their arena from one thread. Elsewhere the arena is
// not `Sync`, so it cannot be made a global allocator.
#[cfg(any(test, all(target_arch = "wasm32", not(target_feature = "atomics"))))]
unsafe impl Sync for EventArena {}

impl Default for EventArena {
    fn default() -> Self {
        Self::new()
    }
}

impl EventArena {
    /// An empty arena.
    pub const fn new() -> Self {
        EventArena {
            region: Region(UnsafeCell::new([0; ARENA_BYTES])),
            bump: UnsafeCell::new(Bump::new()),
        }
    }

    fn base(&self) -> *mut u8 {
        self.region.0.get().cast()
    }

    /// The arena offset of `ptr`, if it points into the arena.
    fn offset(&self, ptr: *mut u8) -> Option<usize> {
        let off = (ptr as usize).checked_sub(self.base() as usize)?;
        (off < ARENA_BYTES).then_some(off)
    }
}

// SAFETY: blocks handed out are disjoint ranges of `region` (the bump only
// moves forward, except to take back the newest block after it is freed) or
// come from `System`; each is sized and aligned as the layout asks.
unsafe impl GlobalAlloc for EventArena {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = self.base();
        // SAFETY: single-threaded; the reference ends with the statement.
        match unsafe { (*self.bump.get()).alloc(base as usize, ARENA_BYTES, layout) } {
            // SAFETY: `alloc` checked that `off + size` is within the region.
            Some(off) => unsafe { base.add(off) },
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match self.offset(ptr) {
            // SAFETY: single-threaded.
            Some(off) => unsafe { (*self.bump.get()).free(off) },
            // SAFETY: not ours, so it came from `System`.
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some(off) = self.offset(ptr) else {
            // SAFETY: not ours, so it came from `System`.
            return unsafe { System.realloc(ptr, layout, new_size) };
        };
        // SAFETY: single-threaded.
        if unsafe { (*self.bump.get()).resize(ARENA_BYTES, off, new_size) } {
            return ptr;
        }
        // SAFETY: the caller guarantees `new_size` with `layout.align()` is a
        // valid layout; the old block stays valid until freed below.
        unsafe {
            let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn bumps_aligned_and_refuses_past_the_end() {
        let mut b = Bump::new();
        assert_eq!(b.alloc(1000, 64, layout(3, 1)), Some(0));
        // Address 1003 rounded up to 8 is 1008: offset 8.
        assert_eq!(b.alloc(1000, 64, layout(8, 8)), Some(8));
        // 1016 rounded up to 16 is 1024: offset 24, and 24 + 40 fills it.
        assert_eq!(b.alloc(1000, 64, layout(40, 16)), Some(24));
        assert_eq!(b.alloc(1000, 64, layout(1, 1)), None);
    }

    #[test]
    fn newest_block_is_freed_and_grown_in_place() {
        let mut b = Bump::new();
        let a = b.alloc(0, 100, layout(10, 1)).unwrap_or(usize::MAX);
        let c = b.alloc(0, 100, layout(10, 1)).unwrap_or(usize::MAX);
        assert!(
            !b.resize(100, a, 20),
            "only the newest block grows in place"
        );
        assert!(b.resize(100, c, 30));
        assert!(!b.resize(100, c, 91), "past the end");
        b.free(a); // not the newest: kept
        b.free(c);
        assert_eq!(
            b.alloc(0, 100, layout(1, 1)),
            Some(10),
            "c's space came back"
        );
    }

    #[test]
    fn falls_back_to_the_system_allocator_and_keeps_contents() {
        let arena = EventArena::new();
        // SAFETY: layouts are non-zero; every block is freed once.
        unsafe {
            let small = arena.alloc(layout(16, 8));
            assert!(arena.offset(small).is_some());
            small.write_bytes(7, 16);
            let grown = arena.realloc(small, layout(16, 8), 64);
            assert_eq!(grown, small, "newest block grows in place");
            let big = arena.alloc(layout(ARENA_BYTES, 8));
            assert!(!big.is_null());
            assert!(arena.offset(big).is_none(), "too big for the arena");
            // Too big to grow in place: moved out, keeping the bytes.
            let moved = arena.realloc(grown, layout(64, 8), ARENA_BYTES + 1);
            assert!(!moved.is_null() && moved != grown);
            assert!(arena.offset(moved).is_none());
            assert_eq!(*moved.add(15), 7);
            // The arena took its space back.
            let again = arena.alloc(layout(16, 8));
            assert_eq!(again, small);
            arena.dealloc(again, layout(16, 8));
            arena.dealloc(moved, layout(ARENA_BYTES + 1, 8));
            arena.dealloc(big, layout(ARENA_BYTES, 8));
        }
    }
}
