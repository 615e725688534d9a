//! SIP transports: UDP sends and TCP connections (framing, outbound
//! connects).

use super::*;

pub(super) async fn tcp_connection(
    stream: tokio::net::TcpStream,
    addr: SocketAddr,
    tx: mpsc::Sender<Input>,
) {
    let (mut rd, mut wr) = stream.into_split();
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(256);
    if tx.send(Input::TcpOpen(addr, out_tx.clone())).await.is_err() {
        return;
    }
    let writer = tokio::spawn(async move {
        while let Some(bytes) = out_rx.recv().await {
            if wr.write_all(&bytes).await.is_err() {
                break;
            }
        }
    });
    let peer = Peer {
        addr,
        transport: Transport::Tcp,
    };
    let mut framer = StreamFramer::new();
    let mut buf = vec![0u8; 16384];
    'read: loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        framer.push(&buf[..n]);
        loop {
            match framer.next_message() {
                Ok(Some(Framed::Message(m))) => {
                    if tx.send(Input::Framed(peer, Ok(m))).await.is_err() {
                        break 'read;
                    }
                }
                Ok(Some(Framed::KeepAlive)) => {
                    let _ = out_tx.send(b"\r\n".to_vec()).await;
                }
                Ok(None) => break,
                Err(e) => {
                    // The stream cannot be resynchronised: answer if we
                    // can, then close (RFC 4475 ncl/mcl01 over TCP).
                    let _ = tx.send(Input::Framed(peer, Err(e))).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break 'read;
                }
            }
        }
    }
    let _ = tx.send(Input::TcpClosed(addr)).await;
    drop(out_tx);
    let _ = writer.await;
}

impl Endpoint {
    pub(super) fn send(&mut self, t: Transmit) {
        match t.to.transport {
            Transport::Udp => {
                if let Err(e) = self.udp.try_send_to(&t.bytes, t.to.addr) {
                    tracing::debug!("sip udp send to {}: {e}", t.to.addr);
                }
            }
            Transport::Tcp => match self.tcp.get(&t.to.addr) {
                Some(conn) => {
                    let _ = conn.try_send(t.bytes);
                }
                None => self.connect_tcp(t.to.addr, t.bytes),
            },
        }
    }

    /// Queues a message for a peer we have no TCP connection to, and
    /// connects (once) in the background; the connection is then served
    /// like an accepted one.
    pub(super) fn connect_tcp(&mut self, addr: SocketAddr, bytes: Vec<u8>) {
        let queued = self.connecting.entry(addr).or_default();
        queued.push(bytes);
        if queued.len() > 1 {
            return;
        }
        let inbox = self.inbox.clone();
        tokio::spawn(async move {
            let connect = tokio::net::TcpStream::connect(addr);
            match tokio::time::timeout(Duration::from_secs(5), connect).await {
                Ok(Ok(stream)) => tcp_connection(stream, addr, inbox).await,
                Ok(Err(e)) => {
                    let _ = inbox.send(Input::TcpFailed(addr, e.to_string())).await;
                }
                Err(_) => {
                    let _ = inbox
                        .send(Input::TcpFailed(addr, "connect timed out".into()))
                        .await;
                }
            }
        });
    }
}
