//! The media clock: one thread per CPU that sends the calls' RTP frames on
//! absolute 20 ms deadlines.
//!
//! A call's task prepares its frames a little ahead ([`DEPTH`] of them) and
//! queues them on its [`Stream`]; a clock thread sleeps until the next
//! deadline computed from one monotonic epoch (no drift, however long the
//! call) and sends the frame that is due on each of its streams. Streams
//! are dealt out to the threads in turn and spread over [`SLOTS`] phases
//! one millisecond apart, so a pass sends for a fortieth of the calls on
//! two CPUs and the last packet of a pass is not held up by a thousand
//! sends before it (with one thread, p99 lateness at 1,000 calls was
//! 2.5–3.5 times a bare timer's on the same machine; with two, 0.8–0.9).
//!
//! The thread never waits for a lock another thread may hold: the queues
//! are lock-free, the statistics atomic, new streams arrive over a channel.
//! A preempted tokio worker holding a mutex would otherwise stall every
//! call's audio behind it (priority inversion). The call tasks are paced
//! by their own tokio timer and only need to stay ahead of the clock.
//!
//! Lateness is measured where it matters: from a frame's deadline to the
//! return of its `sendto`. A frame the call had not prepared in time (an
//! underrun) counts as a whole frame late; the call then drops one frame so
//! that its RTP timestamps stay on the wall clock.
//!
//! The thread asks for real-time scheduling (`SCHED_FIFO`, lowest real-time
//! priority), as FreeSWITCH and Asterisk do for their media timers; without
//! the privilege it runs at normal priority and says so in the log.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

/// The frame period.
pub const PTIME: Duration = Duration::from_millis(20);
/// Phases per frame period.
pub const SLOTS: usize = 20;
/// Frames a call keeps prepared ahead of the clock (60 ms: with two,
/// frames were not ready 10–20 times as often at 1,000 calls).
pub const DEPTH: usize = 3;
/// How far behind the clock may fall before it restarts its timeline.
const RESYNC: Duration = Duration::from_millis(200);

/// The largest RTP packet a stream carries (a 20 ms G.711 frame is 172).
pub const MAX_PACKET: usize = 256;

/// An RTP packet and where it goes, held inline: the clock thread never
/// allocates or frees (a free can wait on the allocator's arena lock).
#[derive(Clone, Copy)]
pub struct Packet {
    bytes: [u8; MAX_PACKET],
    len: u16,
    to: SocketAddr,
}

impl Packet {
    /// The packet's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len).min(MAX_PACKET)]
    }

    /// Where it goes.
    pub fn to(&self) -> SocketAddr {
        self.to
    }

    /// Copies `bytes`; `None` when longer than [`MAX_PACKET`].
    pub fn new(bytes: &[u8], to: SocketAddr) -> Option<Packet> {
        let mut p = Packet {
            bytes: [0; MAX_PACKET],
            len: u16::try_from(bytes.len()).ok()?,
            to,
        };
        p.bytes.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(p)
    }
}

/// One frame period's worth of output: a packet, or nothing (not
/// answered yet, on hold).
pub type Frame = Option<Packet>;

/// A call's outgoing RTP, fed by the call's task and drained by the clock.
pub struct Stream {
    socket: UdpSocket,
    queue: ArrayQueue<Frame>,
    lateness: Histogram,
    underruns: AtomicU64,
    missed: AtomicU64,
}

impl Stream {
    /// Frames waiting to be sent.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Queues the next frame; false when the queue is full (the frame is
    /// dropped).
    pub fn push(&self, frame: Frame) -> bool {
        self.queue.push(frame).is_ok()
    }

    /// Frames the clock found missing since the last call: the caller
    /// should prepare and drop that many to stay on the timeline.
    pub fn take_missed(&self) -> u64 {
        self.missed.swap(0, Ordering::Relaxed)
    }

    /// Send lateness statistics so far.
    pub fn stats(&self) -> Lateness {
        Lateness {
            p50_us: self.lateness.percentile(0.5),
            p99_us: self.lateness.percentile(0.99),
            max_us: self.lateness.max.load(Ordering::Relaxed),
            underruns: self.underruns.load(Ordering::Relaxed),
        }
    }

    /// Sends the frame due at `deadline`.
    fn send(&self, deadline: Instant) {
        let late = match self.queue.pop() {
            Some(Some(p)) => {
                // A full socket buffer drops the frame, as the network would.
                let _ = self.socket.send_to(&p.bytes[..usize::from(p.len)], p.to);
                Instant::now().saturating_duration_since(deadline)
            }
            Some(None) => Instant::now().saturating_duration_since(deadline),
            None => {
                self.underruns.fetch_add(1, Ordering::Relaxed);
                self.missed.fetch_add(1, Ordering::Relaxed);
                PTIME
            }
        };
        self.lateness
            .record(late.as_micros().min(u128::from(u32::MAX)) as u32);
    }
}

/// Send lateness of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lateness {
    /// Median, µs (upper edge of its histogram bucket).
    pub p50_us: u32,
    /// 99th percentile, µs (upper edge of its histogram bucket).
    pub p99_us: u32,
    /// Worst frame, µs.
    pub max_us: u32,
    /// Frames that were not ready when due.
    pub underruns: u64,
}

/// A lock-free histogram of microseconds: 10 µs buckets up to 2 ms,
/// 100 µs up to 20 ms, 1 ms up to 200 ms, then one overflow bucket.
struct Histogram {
    buckets: Vec<AtomicU32>,
    max: AtomicU32,
}

const FINE: u32 = 200; // 0..2000 µs by 10
const MID: u32 = 180; // 2000..20000 µs by 100
const COARSE: u32 = 180; // 20000..200000 µs by 1000

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            buckets: (0..FINE + MID + COARSE + 1)
                .map(|_| AtomicU32::new(0))
                .collect(),
            max: AtomicU32::new(0),
        }
    }

    fn bucket(us: u32) -> usize {
        (match us {
            0..2_000 => us / 10,
            2_000..20_000 => FINE + (us - 2_000) / 100,
            20_000..200_000 => FINE + MID + (us - 20_000) / 1_000,
            _ => FINE + MID + COARSE,
        }) as usize
    }

    /// The largest value a bucket holds.
    fn upper(bucket: usize) -> u32 {
        let b = bucket as u32;
        if b < FINE {
            b * 10 + 9
        } else if b < FINE + MID {
            2_000 + (b - FINE) * 100 + 99
        } else if b < FINE + MID + COARSE {
            20_000 + (b - FINE - MID) * 1_000 + 999
        } else {
            u32::MAX
        }
    }

    fn record(&self, us: u32) {
        self.buckets[Self::bucket(us)].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(us, Ordering::Relaxed);
    }

    fn percentile(&self, p: f64) -> u32 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| u64::from(b.load(Ordering::Relaxed)))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((total - 1) as f64 * p) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen > rank {
                return Self::upper(i).min(self.max.load(Ordering::Relaxed));
            }
        }
        self.max.load(Ordering::Relaxed)
    }
}

/// The clock threads' handle. Cloning shares the threads.
#[derive(Clone)]
pub struct MediaClock {
    threads: Arc<[mpsc::Sender<Weak<Stream>>]>,
    next: Arc<AtomicU64>,
}

impl MediaClock {
    /// Starts one clock thread per CPU (streams are dealt out in turn, so
    /// each pass is shorter and a busy CPU delays only its share). A
    /// thread sleeps while it has no stream and ends when the last handle
    /// is dropped and no stream is left.
    pub fn start() -> std::io::Result<MediaClock> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = mpsc::channel();
            std::thread::Builder::new()
                .name(format!("media-clock-{i}"))
                .spawn(move || run(rx))?;
            threads.push(tx);
        }
        Ok(MediaClock {
            threads: threads.into(),
            next: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Registers a socket (a clone of the call's RTP socket) and returns
    /// its stream. The stream leaves the clock when the returned handle is
    /// dropped.
    pub fn register(&self, socket: UdpSocket) -> Arc<Stream> {
        let stream = Arc::new(Stream {
            socket,
            queue: ArrayQueue::new(DEPTH + 4),
            lateness: Histogram::new(),
            underruns: AtomicU64::new(0),
            missed: AtomicU64::new(0),
        });
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.threads.len();
        let _ = self.threads[i].send(Arc::downgrade(&stream));
        stream
    }
}

fn raise_priority() {
    use thread_priority::{
        RealtimeThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    match set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Realtime(RealtimeThreadSchedulePolicy::Fifo),
    ) {
        Ok(()) => tracing::info!("media clock runs with real-time priority"),
        Err(e) => tracing::warn!(
            "media clock runs at normal priority (real-time scheduling refused: {e:?}); \
             RTP pacing may suffer on a busy machine"
        ),
    }
}

fn run(new_streams: mpsc::Receiver<Weak<Stream>>) {
    raise_priority();
    let step = PTIME / SLOTS as u32;
    let mut slots: Vec<Vec<Weak<Stream>>> = vec![Vec::new(); SLOTS];
    let mut count = 0usize;
    let mut epoch = Instant::now();
    let mut n: u64 = 0;
    let mut due = Vec::new();
    loop {
        if count == 0 {
            // Idle: wait for a stream, then start a new timeline.
            match new_streams.recv() {
                Ok(s) => {
                    slots[0].push(s);
                    count = 1;
                }
                Err(_) => return,
            }
            epoch = Instant::now() + step;
            n = 0;
        }
        // Newcomers go to the least busy phase.
        while let Ok(s) = new_streams.try_recv() {
            if let Some(slot) = slots.iter_mut().min_by_key(|s| s.len()) {
                slot.push(s);
                count += 1;
            }
        }
        let deadline = epoch + Duration::from_nanos(n * step.as_nanos() as u64);
        let now = Instant::now();
        if deadline > now {
            std::thread::sleep(deadline - now);
        } else if now - deadline > RESYNC {
            // Far behind (the process was stopped, or the machine
            // suspended): start a new timeline instead of bursting.
            epoch = now;
            n = 0;
            continue;
        }
        let slot = &mut slots[(n % SLOTS as u64) as usize];
        let before = slot.len();
        slot.retain(|w| w.strong_count() > 0);
        count -= before - slot.len();
        due.extend(slot.iter().filter_map(Weak::upgrade));
        for s in &due {
            s.send(deadline);
        }
        due.clear();
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles_are_bucket_upper_edges() {
        let h = Histogram::new();
        assert_eq!(h.percentile(0.5), 0);
        for us in [5, 15, 25, 2_050, 30_000] {
            h.record(us);
        }
        assert_eq!(h.percentile(0.0), 9);
        assert_eq!(h.percentile(0.5), 29);
        assert_eq!(h.percentile(0.75), 2_099);
        assert_eq!(h.percentile(1.0), 30_000);
        h.record(1_000_000);
        assert_eq!(h.percentile(1.0), 1_000_000);
        for us in [0, 1_999, 2_000, 19_999, 20_000, 199_999, 200_000] {
            assert!(Histogram::upper(Histogram::bucket(us)) >= us, "{us}");
        }
    }

    #[test]
    fn frames_go_out_in_order_and_gaps_count_as_underruns() -> std::io::Result<()> {
        let clock = MediaClock::start()?;
        let rx = UdpSocket::bind("127.0.0.1:0")?;
        rx.set_read_timeout(Some(Duration::from_secs(2)))?;
        let to = rx.local_addr()?;
        let stream = clock.register(UdpSocket::bind("127.0.0.1:0")?);
        for i in 0u8..5 {
            assert!(stream.push(Packet::new(&[i], to)));
        }
        assert!(stream.push(None));
        let mut buf = [0u8; 8];
        for i in 0u8..5 {
            let n = rx.recv(&mut buf)?;
            assert_eq!(&buf[..n], &[i]);
        }
        // Six frames were queued; the clock then finds the queue empty.
        for _ in 0..100 {
            if stream.stats().underruns > 0 {
                break;
            }
            std::thread::sleep(PTIME);
        }
        let stats = stream.stats();
        assert!(stats.underruns > 0, "{stats:?}");
        assert!(stream.take_missed() > 0);
        assert_eq!(stream.queued(), 0);
        // A dropped stream leaves the clock; the thread serves others.
        drop(stream);
        let other = clock.register(UdpSocket::bind("127.0.0.1:0")?);
        other.push(Packet::new(&[9], to));
        let n = rx.recv(&mut buf)?;
        assert_eq!(&buf[..n], &[9]);
        Ok(())
    }
}
