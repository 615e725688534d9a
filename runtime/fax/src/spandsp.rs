//! The thin FFI to libspandsp 0.0.6's fax terminals — over audio
//! ([`Fax`]) and over T.38 ([`T38`]) — and its fax tone detector
//! ([`Cng`]): the only unsafe code of the crate, kept here.
//!
//! Only the calls the [`crate::Terminal`] needs are declared, with the
//! prototypes of Debian's `/usr/include/spandsp/{fax,t30,t30_api,
//! t30_logging,t38_core,t38_terminal,modem_connect_tones}.h` (0.0.6). The library is linked
//! dynamically (see `build.rs`).
//!
//! Safety rules kept by [`Fax`] and [`T38`]:
//! - the state is allocated by `fax_init(NULL, …)` / `t38_terminal_init(
//!   NULL, …)` and freed once, in `Drop`, by `fax_free` /
//!   `t38_terminal_free`;
//! - it is only touched through `&mut self` (spandsp keeps no global or
//!   thread-local state for it), so moving it to another thread is sound;
//! - the callbacks' `user_data` point into `Box`es the same struct owns
//!   (the phase E slot in [`T30`], the T.38 packet queue), freed only after
//!   the state, so they outlive every call spandsp makes through them;
//! - every string handed over is a `CString` that lives across the call
//!   (spandsp copies identities and file names).
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_int, c_void};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};

#[repr(C)]
struct FaxState {
    _private: [u8; 0],
}

#[repr(C)]
struct T30State {
    _private: [u8; 0],
}

#[repr(C)]
struct T38TerminalState {
    _private: [u8; 0],
}

#[repr(C)]
struct T38CoreState {
    _private: [u8; 0],
}

#[repr(C)]
struct ToneRxState {
    _private: [u8; 0],
}

type ToneReport = extern "C" fn(*mut c_void, c_int, c_int, c_int);

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

type T38TxHandler = extern "C" fn(*mut T38CoreState, *mut c_void, *const u8, c_int, c_int) -> c_int;

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
    fn t38_terminal_init(
        s: *mut T38TerminalState,
        calling_party: c_int,
        tx_packet_handler: T38TxHandler,
        tx_packet_user_data: *mut c_void,
    ) -> *mut T38TerminalState;
    fn t38_terminal_free(s: *mut T38TerminalState) -> c_int;
    fn t38_terminal_send_timeout(s: *mut T38TerminalState, samples: c_int) -> c_int;
    fn t38_terminal_get_t30_state(s: *mut T38TerminalState) -> *mut T30State;
    fn t38_terminal_get_t38_core_state(s: *mut T38TerminalState) -> *mut T38CoreState;
    fn t38_terminal_set_tep_mode(s: *mut T38TerminalState, use_tep: c_int);
    fn t38_set_t38_version(s: *mut T38CoreState, t38_version: c_int);
    fn t38_set_data_rate_management_method(s: *mut T38CoreState, method: c_int);
    fn t38_set_fastest_image_data_rate(s: *mut T38CoreState, max_rate: c_int);
    fn t38_set_max_datagram_size(s: *mut T38CoreState, max_datagram_size: c_int);
    fn t38_core_rx_ifp_packet(
        s: *mut T38CoreState,
        buf: *const u8,
        len: c_int,
        seq_no: u16,
    ) -> c_int;
    fn modem_connect_tones_rx_init(
        s: *mut ToneRxState,
        tone_type: c_int,
        tone_callback: Option<ToneReport>,
        user_data: *mut c_void,
    ) -> *mut ToneRxState;
    fn modem_connect_tones_rx(s: *mut ToneRxState, amp: *const i16, len: c_int) -> c_int;
    fn modem_connect_tones_rx_get(s: *mut ToneRxState) -> c_int;
    fn modem_connect_tones_rx_free(s: *mut ToneRxState) -> c_int;
}

/// `MODEM_CONNECT_TONES_FAX_CNG`: 1100 Hz in 0.5 s bursts.
const TONE_FAX_CNG: c_int = 1;

/// spandsp's detector of a fax machine's calling tone (CNG).
pub(crate) struct Cng {
    state: NonNull<ToneRxState>,
}

// SAFETY: as for `Fax`: reached only through `&mut self`.
unsafe impl Send for Cng {}

impl Cng {
    pub fn new() -> Option<Cng> {
        // SAFETY: a null `s` asks spandsp to allocate the state; no
        // callback (the result is read with `modem_connect_tones_rx_get`).
        let state = unsafe {
            modem_connect_tones_rx_init(
                std::ptr::null_mut(),
                TONE_FAX_CNG,
                None,
                std::ptr::null_mut(),
            )
        };
        NonNull::new(state).map(|state| Cng { state })
    }

    /// Audio heard; true once the tone was heard.
    pub fn heard(&mut self, samples: &[i16]) -> bool {
        let len = c_int::try_from(samples.len()).unwrap_or(c_int::MAX);
        // SAFETY: live state; `samples` holds `len` samples, only read.
        unsafe {
            modem_connect_tones_rx(self.state.as_ptr(), samples.as_ptr(), len);
            modem_connect_tones_rx_get(self.state.as_ptr()) == TONE_FAX_CNG
        }
    }
}

impl Drop for Cng {
    fn drop(&mut self) {
        // SAFETY: the state from `modem_connect_tones_rx_init`, freed once.
        unsafe { modem_connect_tones_rx_free(self.state.as_ptr()) };
    }
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

/// The T.30 engine inside either terminal, and the phase E slot it
/// reports through. Only lent out shared (`&T30`, its calls take
/// `&self`): nothing can swap it out of the terminal whose state it
/// points into.
pub(crate) struct T30 {
    t30: NonNull<T30State>,
    /// The phase E slot spandsp writes through (from `Box::leak`, freed in
    /// `Drop` — which runs after the owning terminal freed its state).
    completion: NonNull<AtomicI32>,
}

/// How a T.30 engine is set up.
pub(crate) struct Setup<'a> {
    /// The side that dialled (sends CNG).
    pub calling: bool,
    /// Our station id.
    pub ident: &'a CStr,
    /// A TIFF/F file to send.
    pub tx: Option<&'a CStr>,
    /// A TIFF/F file to receive into.
    pub rx: Option<&'a CStr>,
    /// Offer error correction.
    pub ecm: bool,
    /// Most pages received.
    pub max_pages: c_int,
}

impl T30 {
    /// Sets up the T.30 engine `t30` of a live terminal.
    ///
    /// # Safety
    /// `t30` is the live T.30 state of a terminal that outlives the
    /// returned value's use and is freed before it is dropped.
    unsafe fn set_up(t30: NonNull<T30State>, setup: &Setup<'_>) -> T30 {
        let completion = NonNull::from(Box::leak(Box::new(AtomicI32::new(PENDING))));
        let t = t30.as_ptr();
        // SAFETY: live state (the caller's promise); the strings outlive
        // the calls (spandsp copies them); the handler's user data is the
        // boxed slot the returned value owns.
        unsafe {
            t30_set_tx_ident(t, setup.ident.as_ptr());
            t30_set_ecm_capability(t, c_int::from(setup.ecm));
            t30_set_supported_modems(t, MODEMS);
            if let Some(f) = setup.tx {
                t30_set_tx_file(t, f.as_ptr(), -1, -1);
            }
            if let Some(f) = setup.rx {
                t30_set_rx_file(t, f.as_ptr(), setup.max_pages);
            }
            t30_set_phase_e_handler(t, phase_e, completion.as_ptr().cast::<c_void>());
        }
        T30 { t30, completion }
    }

    /// The phase E completion code, once the session ended.
    pub fn completion(&self) -> Option<i32> {
        // SAFETY: the slot lives until `Drop`.
        let slot = unsafe { self.completion.as_ref() };
        Some(slot.load(Ordering::Relaxed)).filter(|c| *c != PENDING)
    }

    /// Ends the session now (the call is over); phase E runs if it has
    /// not.
    pub fn terminate(&self) {
        // SAFETY: live state.
        unsafe { t30_terminate(self.t30.as_ptr()) };
    }

    /// The transfer statistics so far.
    pub fn stats(&self) -> RawStats {
        let mut s = RawStats::default();
        // SAFETY: live state; `s` is a `t30_stats_t`.
        unsafe { t30_get_transfer_statistics(self.t30.as_ptr(), &mut s) };
        s
    }

    /// The far end's identity (TSI or CSI), as it sent it.
    pub fn remote_ident(&self) -> String {
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

impl Drop for T30 {
    fn drop(&mut self) {
        // SAFETY: from `Box::leak`, freed once; the terminal that called
        // the handler freed its state before its fields drop.
        unsafe { drop(Box::from_raw(self.completion.as_ptr())) };
    }
}

/// One spandsp fax terminal (`fax_state_t`) over audio.
pub(crate) struct Fax {
    state: NonNull<FaxState>,
    /// Its T.30 engine (dropped after `Drop::drop` freed the state).
    t30: T30,
}

// SAFETY: the state is only reached through `&mut self`; spandsp keeps no
// thread-bound state for it.
unsafe impl Send for Fax {}

impl Fax {
    /// A terminal over audio; `calling` sends CNG (the side that
    /// dialled), the other CED. spandsp copies file names into 256 bytes:
    /// the caller keeps them shorter.
    pub fn new(setup: &Setup<'_>) -> Option<Fax> {
        // SAFETY: a null `s` asks spandsp to allocate the state.
        let state =
            NonNull::new(unsafe { fax_init(std::ptr::null_mut(), c_int::from(setup.calling)) })?;
        // SAFETY: `state` is a live state from `fax_init`.
        let Some(t30) = NonNull::new(unsafe { fax_get_t30_state(state.as_ptr()) }) else {
            // SAFETY: freed once, here, as it is not returned.
            unsafe { fax_free(state.as_ptr()) };
            return None;
        };
        // SAFETY: `t30` is inside `state`, which the returned `Fax` frees
        // before its `t30` field drops.
        let t30 = unsafe { T30::set_up(t30, setup) };
        // SAFETY: live state.
        unsafe { fax_set_transmit_on_idle(state.as_ptr(), 1) };
        Some(Fax { state, t30 })
    }

    /// Its T.30 engine.
    pub fn t30(&self) -> &T30 {
        &self.t30
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
}

impl Drop for Fax {
    fn drop(&mut self) {
        // SAFETY: the state from `fax_init`, freed once; its T.30 slot is
        // freed after, when the field drops.
        unsafe { fax_free(self.state.as_ptr()) };
    }
}

/// IFP packets spandsp asked to send, with how many times each.
type Outbox = Mutex<Vec<(Vec<u8>, u32)>>;

extern "C" fn t38_tx(
    _s: *mut T38CoreState,
    user: *mut c_void,
    buf: *const u8,
    len: c_int,
    count: c_int,
) -> c_int {
    let Ok(len) = usize::try_from(len) else {
        return -1;
    };
    if buf.is_null() {
        return -1;
    }
    // SAFETY: `user` is the `Outbox` boxed by the `T38` that owns the state
    // calling us; `buf` holds `len` bytes for the length of the call.
    let (outbox, bytes) = unsafe {
        (
            &*(user as *const Outbox),
            std::slice::from_raw_parts(buf, len),
        )
    };
    let count = u32::try_from(count).unwrap_or(1).clamp(1, 3);
    if let Ok(mut q) = outbox.lock() {
        q.push((bytes.to_vec(), count));
    }
    0
}

/// T.38 session parameters spandsp is told (from the SDP).
#[derive(Debug, Clone, Copy)]
pub(crate) struct T38Options {
    /// `T38FaxVersion`.
    pub version: c_int,
    /// `T38MaxBitRate`.
    pub max_bit_rate: c_int,
    /// `T38FaxRateManagement:transferredTCF` (else `localTCF`).
    pub transferred_tcf: bool,
    /// `T38FaxMaxDatagram`.
    pub max_datagram: c_int,
}

/// One spandsp fax terminal over T.38 (`t38_terminal_state_t`): IFP
/// packets in and out, paced by the samples that go by.
pub(crate) struct T38 {
    state: NonNull<T38TerminalState>,
    core: NonNull<T38CoreState>,
    /// Where the packet handler puts what to send (from `Box::leak`,
    /// freed in `Drop` after the state).
    outbox: NonNull<Outbox>,
    /// Its T.30 engine (dropped after `Drop::drop` freed the state).
    t30: T30,
}

// SAFETY: as for `Fax`; the outbox is a `Mutex`.
unsafe impl Send for T38 {}

impl T38 {
    /// A terminal over T.38.
    pub fn new(setup: &Setup<'_>, options: T38Options) -> Option<T38> {
        let outbox = NonNull::from(Box::leak(Box::new(Outbox::default())));
        let free_outbox = || {
            // SAFETY: from `Box::leak` above, not handed to a live state.
            unsafe { drop(Box::from_raw(outbox.as_ptr())) };
        };
        // SAFETY: a null `s` asks spandsp to allocate the state; the
        // handler's user data is the boxed outbox, freed only after it.
        let state = unsafe {
            t38_terminal_init(
                std::ptr::null_mut(),
                c_int::from(setup.calling),
                t38_tx,
                outbox.as_ptr().cast::<c_void>(),
            )
        };
        let Some(state) = NonNull::new(state) else {
            free_outbox();
            return None;
        };
        // SAFETY: `state` is live.
        let (t30, core) = unsafe {
            (
                NonNull::new(t38_terminal_get_t30_state(state.as_ptr())),
                NonNull::new(t38_terminal_get_t38_core_state(state.as_ptr())),
            )
        };
        let (Some(t30), Some(core)) = (t30, core) else {
            // SAFETY: freed once, here, as it is not returned; then the
            // outbox nothing can reach any more.
            unsafe { t38_terminal_free(state.as_ptr()) };
            free_outbox();
            return None;
        };
        // SAFETY: `t30` is inside `state`, freed before the field drops.
        let t30 = unsafe { T30::set_up(t30, setup) };
        let method = if options.transferred_tcf { 2 } else { 1 };
        // SAFETY: live states.
        unsafe {
            let c = core.as_ptr();
            t38_set_t38_version(c, options.version);
            t38_set_data_rate_management_method(c, method);
            t38_set_fastest_image_data_rate(c, options.max_bit_rate);
            t38_set_max_datagram_size(c, options.max_datagram);
            t38_terminal_set_tep_mode(state.as_ptr(), 0);
        }
        Some(T38 {
            state,
            core,
            outbox,
            t30,
        })
    }

    /// Its T.30 engine.
    pub fn t30(&self) -> &T30 {
        &self.t30
    }

    /// An IFP packet from the far end, with its UDPTL sequence number.
    pub fn rx(&mut self, ifp: &[u8], seq: u16) {
        let len = c_int::try_from(ifp.len()).unwrap_or(c_int::MAX);
        // SAFETY: live state; `ifp` holds `len` bytes.
        unsafe { t38_core_rx_ifp_packet(self.core.as_ptr(), ifp.as_ptr(), len, seq) };
    }

    /// Lets `samples` (at 8 kHz) of time go by.
    pub fn advance(&mut self, samples: c_int) {
        // SAFETY: live state.
        unsafe { t38_terminal_send_timeout(self.state.as_ptr(), samples) };
    }

    /// The IFP packets to send since last asked, each with how many times
    /// to send it.
    pub fn take(&mut self) -> Vec<(Vec<u8>, u32)> {
        // SAFETY: the outbox lives until `Drop`.
        let outbox = unsafe { self.outbox.as_ref() };
        outbox
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default()
    }
}

impl Drop for T38 {
    fn drop(&mut self) {
        // SAFETY: the state from `t38_terminal_init`, freed once; then the
        // outbox its handler wrote to, from `Box::leak`, when nothing can
        // call the handler any more. The T.30 slot is freed after, when
        // the field drops.
        unsafe {
            t38_terminal_free(self.state.as_ptr());
            drop(Box::from_raw(self.outbox.as_ptr()));
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
