//! Mixing the parties of a supervised call, one 20 ms frame at a time: who
//! hears whom when a supervisor listens, whispers to the agent or barges
//! in (Asterisk's ChanSpy modes, FreeSWITCH's eavesdrop). Samples are
//! added with saturation; a party that sent nothing this frame counts as
//! silence. Written here because it is a few lines of arithmetic on
//! frames the voice channel already holds: a conference crate would bring
//! its own sockets and clock.

pub use plugboard_core::MonitorMode;

use crate::audio::FRAME;

/// One frame: up to [`FRAME`] samples (fewer or none: the rest is
/// silence).
pub type Frame = [i16; FRAME];

/// Adds frames with saturation; missing parties are silent.
pub fn mix(parts: &[Option<&[i16]>]) -> Frame {
    let mut acc = [0i32; FRAME];
    for part in parts.iter().flatten() {
        for (a, s) in acc.iter_mut().zip(part.iter()) {
            *a += i32::from(*s);
        }
    }
    acc.map(|v| v.clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16)
}

/// What each party of a supervised call hears this frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heard {
    /// What the customer hears.
    pub customer: Frame,
    /// What the agent hears.
    pub agent: Frame,
    /// What the supervisor hears.
    pub supervisor: Frame,
}

/// Routes one frame of each party's speech by the supervisor's mode: the
/// supervisor always hears the customer and the agent; the agent hears
/// the supervisor when whispered to or barged; the customer hears the
/// supervisor only in a barge.
pub fn supervise(
    mode: MonitorMode,
    customer: Option<&[i16]>,
    agent: Option<&[i16]>,
    supervisor: Option<&[i16]>,
) -> Heard {
    let sup_to_agent = matches!(mode, MonitorMode::Whisper | MonitorMode::Barge);
    let sup_to_customer = mode == MonitorMode::Barge;
    Heard {
        customer: mix(&[agent, supervisor.filter(|_| sup_to_customer)]),
        agent: mix(&[customer, supervisor.filter(|_| sup_to_agent)]),
        supervisor: mix(&[customer, agent]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(frame: &Frame) -> i64 {
        frame.iter().map(|s| i64::from(*s).abs()).sum()
    }

    #[test]
    fn mixing_adds_and_saturates() {
        let a = [20_000i16; FRAME];
        let b = [20_000i16; FRAME];
        let c = [-30_000i16; FRAME];
        assert_eq!(mix(&[Some(&a), Some(&b)])[0], i16::MAX);
        assert_eq!(mix(&[Some(&c), Some(&c)])[0], i16::MIN);
        assert_eq!(mix(&[Some(&a), Some(&c)])[7], -10_000);
        assert_eq!(mix(&[None, Some(&a[..10])])[9], 20_000);
        assert_eq!(mix(&[None, Some(&a[..10])])[10], 0);
        assert_eq!(mix(&[]), [0; FRAME]);
    }

    #[test]
    fn each_mode_decides_who_hears_the_supervisor() {
        let (c, a, s) = ([100i16; FRAME], [1_000i16; FRAME], [10_000i16; FRAME]);
        let run = |mode| supervise(mode, Some(&c), Some(&a), Some(&s));
        let listen = run(MonitorMode::Listen);
        assert_eq!(listen.customer, a);
        assert_eq!(listen.agent, c);
        assert_eq!(listen.supervisor[0], 1_100);
        let whisper = run(MonitorMode::Whisper);
        assert_eq!(whisper.customer, a, "the customer never hears a whisper");
        assert_eq!(whisper.agent[0], 10_100);
        assert_eq!(whisper.supervisor[0], 1_100);
        let barge = run(MonitorMode::Barge);
        assert_eq!(barge.customer[0], 11_000);
        assert_eq!(barge.agent[0], 10_100);
        assert_eq!(barge.supervisor[0], 1_100);
        // A silent supervisor changes nothing.
        let quiet = supervise(MonitorMode::Barge, Some(&c), Some(&a), None);
        assert_eq!(quiet.customer, a);
        assert_eq!(level(&quiet.agent), level(&c));
    }
}
