//! Media for Plugboard's voice channel, sans-IO: G.711, SDP offer/answer,
//! RTP/RTCP packets with a jitter buffer, DTMF (RFC 4733, SIP INFO and
//! in-band Goertzel), WAV clips resampled to 8 kHz, tones, music on hold,
//! mixing for supervised calls, and the espeak-ng text-to-speech runner. The voice crate's tokio tasks
//! own the sockets and the clock.

pub mod audio;
pub mod dtmf;
pub mod g711;
pub mod mix;
pub mod rtp;
pub mod sdp;
pub mod tts;
