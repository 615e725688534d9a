//! The thin FFI to libspandsp 0.0.6's fax terminal: the only unsafe code
//! of the crate, kept here.
//!
//! Only the calls the [`crate::Terminal`] needs are declared, with the
//! prototypes of Debian's `/usr/include/spandsp/{fax,t30,t30_api,
//! t30_logging}.h` (0.0.6). The library is linked dynamically (see
//! `build.rs`).
//!
//! Safety rules kept by [`Fax`]:
//! - the `fax_state_t` is allocated by `fax_init(NULL, …)` and freed once,
//!   in `Drop`, by `fax_free`;
//! - it is only touched through `&mut self` (spandsp keeps no global or
//!   thread-local state for it), so moving it to another thread is sound;
//! - the phase E callback's `user_data` points into a `Box` the same
//!   struct owns, which outlives the state;
//! - every string handed over is a `CString` that lives across the call
//!   (spandsp copies identities and file names).
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_int, c_void};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI32, Ordering};

#[repr(C)]
struct FaxState {
    _private: [u8; 0],
}

#[repr(C)]
struct T30State {
    _private: [u8; 0],
}

/// `t30_stats_t` of spandsp 0.0.6 (fifteen `int`s).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RawStats {
    pub bit_rate: c_int,
    pub error_correcting_mode: c_int,
    pub pages_tx: c_int,
    pub pages_rx: c_int,
    pub pages_in_file: c_int,
    pub x_resolution: c_int,
    pub y_resolution: c_int,
    pub width: c_int,
    pub length: c_int,
    pub image_size: c_int,
    pub encoding: c_int,
    pub bad_rows: c_int,
    pub longest_bad_row_run: c_int,
    pub error_correcting_mode_retries: c_int,
    pub current_status: c_int,
}

type PhaseEHandler = extern "C" fn(*mut T30State, *mut c_void, c_int);

unsafe extern "C" {
    fn fax_init(s: *mut FaxState, calling_party: c_int) -> *mut FaxState;
    fn fax_free(s: *mut FaxState) -> c_int;
    fn fax_rx(s: *mut FaxState, amp: *mut i16, len: c_int) -> c_int;
    fn fax_tx(s: *mut FaxState, amp: *mut i16, max_len: c_int) -> c_int;
    fn fax_set_transmit_on_idle(s: *mut FaxState, transmit_on_idle: c_int);
    fn fax_get_t30_state(s: *mut FaxState) -> *mut T30State;
    fn t30_set_tx_ident(s: *mut T30State, id: *const c_char) -> c_int;
    fn t30_get_rx_ident(s: *mut T30State) -> *const c_char;
    fn t30_set_tx_file(s: *mut T30State, file: *const c_char, start_page: c_int, stop_page: c_int);
    fn t30_set_rx_file(s: *mut T30State, file: *const c_char, stop_page: c_int);
    fn t30_set_ecm_capability(s: *mut T30State, enabled: c_int) -> c_int;
    fn t30_set_supported_modems(s: *mut T30State, supported_modems: c_int) -> c_int;
    fn t30_set_phase_e_handler(s: *mut T30State, handler: PhaseEHandler, user_data: *mut c_void);
    fn t30_get_transfer_statistics(s: *mut T30State, t: *mut RawStats);
    fn t30_terminate(s: *mut T30State);
    fn t30_completion_code_to_str(result: c_int) -> *const c_char;
}

/// V.27ter, V.29 and V.17 (`T30_SUPPORT_V27TER | T30_SUPPORT_V29 |
/// T30_SUPPORT_V17`).
const MODEMS: c_int = 0x01 | 0x02 | 0x04;

/// No phase E yet.
const PENDING: i32 = -1;

extern "C" fn phase_e(_s: *mut T30State, user: *mut c_void, code: c_int) {
    // SAFETY: `user` is the `AtomicI32` boxed by the `Fax` that owns the
    // state calling us (see `Fax::new`).
    let slot = unsafe { &*(user as *const AtomicI32) };
    slot.store(code, Ordering::Relaxed);
}

/// One spandsp fax terminal (`fax_state_t`) over audio.
pub(crate) struct Fax {
    state: NonNull<FaxState>,
    t30: NonNull<T30State>,
    /// The phase E slot spandsp writes through (from `Box::into_raw`,
    /// freed in `Drop` after the state).
    completion: NonNull<AtomicI32>,
}

// SAFETY: the state is only reached through `&mut self`; spandsp keeps no
// thread-bound state for it.
unsafe impl Send for Fax {}

impl Fax {
    /// A terminal; `calling` sends CNG (the side that dialled), the other
    /// CED. `tx` is a TIFF/F file to send, `rx` one to write, at most
    /// `max_pages` pages (spandsp copies file names into 256 bytes: the
    /// caller keeps them shorter).
    pub fn new(
        calling: bool,
        ident: &CStr,
        tx: Option<&CStr>,
        rx: Option<&CStr>,
        ecm: bool,
        max_pages: c_int,
    ) -> Option<Fax> {
        // SAFETY: a null `s` asks spandsp to allocate the state.
        let state = NonNull::new(unsafe { fax_init(std::ptr::null_mut(), c_int::from(calling)) })?;
        // SAFETY: `state` is a live state from `fax_init`.
        let Some(t30) = NonNull::new(unsafe { fax_get_t30_state(state.as_ptr()) }) else {
            // SAFETY: freed once, here, as it is not returned.
            unsafe { fax_free(state.as_ptr()) };
            return None;
        };
        let completion = NonNull::from(Box::leak(Box::new(AtomicI32::new(PENDING))));
        let fax = Fax {
            state,
            t30,
            completion,
        };
        let t = fax.t30.as_ptr();
        // SAFETY: live states; the strings outlive the calls (spandsp copies
        // them); the handler's user data is the boxed slot `fax` owns.
        unsafe {
            fax_set_transmit_on_idle(fax.state.as_ptr(), 1);
            t30_set_tx_ident(t, ident.as_ptr());
            t30_set_ecm_capability(t, c_int::from(ecm));
            t30_set_supported_modems(t, MODEMS);
            if let Some(f) = tx {
                t30_set_tx_file(t, f.as_ptr(), -1, -1);
            }
            if let Some(f) = rx {
                t30_set_rx_file(t, f.as_ptr(), max_pages);
            }
            let user = fax.completion.as_ptr().cast::<c_void>();
            t30_set_phase_e_handler(t, phase_e, user);
        }
        Some(fax)
    }

    /// Audio heard from the far end (8 kHz, 16-bit).
    pub fn rx(&mut self, samples: &[i16]) {
        let mut copy = samples.to_vec();
        let len = c_int::try_from(copy.len()).unwrap_or(c_int::MAX);
        // SAFETY: live state; `copy` holds `len` samples.
        unsafe { fax_rx(self.state.as_ptr(), copy.as_mut_ptr(), len) };
    }

    /// Audio to send; fills all of `out` (silence when idle).
    pub fn tx(&mut self, out: &mut [i16]) {
        let len = c_int::try_from(out.len()).unwrap_or(c_int::MAX);
        // SAFETY: live state; `out` has room for `len` samples.
        let n = unsafe { fax_tx(self.state.as_ptr(), out.as_mut_ptr(), len) };
        let n = usize::try_from(n).unwrap_or(0).min(out.len());
        out[n..].fill(0);
    }

    /// The phase E completion code, once the session ended.
    pub fn completion(&self) -> Option<i32> {
        // SAFETY: the slot lives until `Drop`.
        let slot = unsafe { self.completion.as_ref() };
        Some(slot.load(Ordering::Relaxed)).filter(|c| *c != PENDING)
    }

    /// Ends the session now (the call is over); phase E runs if it has
    /// not.
    pub fn terminate(&mut self) {
        // SAFETY: live state.
        unsafe { t30_terminate(self.t30.as_ptr()) };
    }

    /// The transfer statistics so far.
    pub fn stats(&mut self) -> RawStats {
        let mut s = RawStats::default();
        // SAFETY: live state; `s` is a `t30_stats_t`.
        unsafe { t30_get_transfer_statistics(self.t30.as_ptr(), &mut s) };
        s
    }

    /// The far end's identity (TSI or CSI), as it sent it.
    pub fn remote_ident(&mut self) -> String {
        // SAFETY: live state; spandsp returns null or a NUL-terminated
        // string inside the state, copied at once.
        unsafe {
            let p = t30_get_rx_ident(self.t30.as_ptr());
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().trim().to_string()
            }
        }
    }
}

impl Drop for Fax {
    fn drop(&mut self) {
        // SAFETY: the state from `fax_init`, freed once; then the slot its
        // handler wrote through, from `Box::leak`, freed once, when nothing
        // can call the handler any more.
        unsafe {
            fax_free(self.state.as_ptr());
            drop(Box::from_raw(self.completion.as_ptr()));
        }
    }
}

/// spandsp's words for a completion code.
pub(crate) fn completion_text(code: i32) -> String {
    // SAFETY: returns a static string for any code.
    unsafe {
        let p = t30_completion_code_to_str(code);
        if p.is_null() {
            format!("code {code}")
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}
