//! The frame codec under a counting allocator: decoding untrusted bytes never allocates, so a
//! damaged length field cannot make a log or a peer reserve what it claims.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use shale_io::frame::{decode, scan, Decoded, FrameLimits, Reject, FRAME_HEADER_BYTES};

struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged; counting touches only a
// const-initialized thread-local, which does not allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|count| count.set(count.get() + 1));
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|count| count.set(count.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

#[test]
fn huge_declared_lengths_never_allocate() {
    // Checks that headers declaring every size up to u32::MAX (above the limit, or within it but
    // past the end of the bytes) are judged from the header alone: no allocation, and the typed
    // result says damaged or incomplete, never a frame.
    let limits = FrameLimits::new(1, 64 << 20);
    for declared in [
        u32::MAX,
        u32::MAX / 2,
        (64 << 20) + 1,
        64 << 20,
        1 << 20,
        100,
    ] {
        let mut bytes = declared.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0xAB; 4 + 32]);
        let mut outcome = None;
        let allocations = allocations_during(|| {
            outcome = Some(match decode(&bytes, 0, limits) {
                Decoded::Frame(_) => "frame",
                Decoded::Incomplete(incomplete) => {
                    assert_eq!(incomplete.needed(), FRAME_HEADER_BYTES + declared as usize);
                    "incomplete"
                }
                Decoded::Damaged(_) => "damaged",
            });
            let stop = scan::<()>(&bytes, 0, limits, |_| Err(Reject::Refuse(())));
            assert!(matches!(stop, Ok(stop) if stop.valid_end == 0 && stop.fault.is_some()));
        });
        assert_eq!(allocations, 0, "declared length {declared}");
        let expected = if declared > 64 << 20 {
            "damaged"
        } else {
            "incomplete"
        };
        assert_eq!(outcome, Some(expected), "declared length {declared}");
    }
}
