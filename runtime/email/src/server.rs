//! The tokio driver of the inbound SMTP server: sockets, STARTTLS,
//! timeouts and per-address connection limits around [`crate::smtp`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use plugboard_core::conns::{ConnectionLimits, Refused};
use plugboard_core::{Channel, Error as CoreError, message::MAX_TEXT_BYTES};
use plugboard_engine::{Engine, EngineError, Inbound};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::auth::MailAuth;
use crate::mime;
use crate::smtp::{Envelope, Limits, Output, Session, Verdict};

/// How the SMTP server runs.
#[derive(Clone)]
pub struct SmtpConfig {
    /// Session limits (host name, sizes, STARTTLS offered).
    pub limits: Limits,
    /// Connections at once from one IP address.
    pub max_per_ip: usize,
    /// Connections at once in all.
    pub max_connections: usize,
    /// How long a client may stay silent.
    pub idle: Duration,
    /// The TLS configuration for STARTTLS (a certificate and its key).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// SPF, DKIM and DMARC checks of each message; none when off.
    pub auth: Option<Arc<MailAuth>>,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            limits: Limits::default(),
            max_per_ip: 20,
            max_connections: 1000,
            idle: Duration::from_secs(300),
            tls: None,
            auth: None,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    /// The certificate or key could not be read.
    #[error("SMTP TLS: {0}")]
    Tls(String),
}

/// A TLS configuration from a PEM certificate chain and key.
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::ServerConfig>, SmtpError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| SmtpError::Tls(format!("certificate: {e}")))?;
    if certs.is_empty() {
        return Err(SmtpError::Tls("no certificate in the PEM".into()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| SmtpError::Tls(format!("key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SmtpError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| SmtpError::Tls(e.to_string()))?;
    Ok(Arc::new(config))
}

/// Serves SMTP on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, engine: Arc<Engine>, mut config: SmtpConfig) {
    // STARTTLS is offered exactly when there is a certificate.
    config.limits.tls = config.tls.is_some();
    let open = ConnectionLimits::new(config.max_connections, config.max_per_ip);
    let config = Arc::new(config);
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("smtp accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let admitted = open.admit(peer.ip()).map_err(|e| match e {
            Refused::FromAddress(_) => "too many connections from your address",
            Refused::InAll(_) => "too many connections, try again later",
        });
        let (engine, config) = (engine.clone(), config.clone());
        tokio::spawn(async move {
            let session = match &admitted {
                Ok(_) => Session::new(config.limits.clone()),
                Err(why) => Session::refuse(config.limits.clone(), why),
            };
            if let Err(e) = connection(socket, peer, session, &engine, &config).await {
                tracing::debug!("smtp {peer}: {e}");
            }
            drop(admitted);
        });
    }
}

/// What a stretch of driving ended with.
enum Next {
    Upgrade,
    Done,
}

async fn connection(
    mut socket: TcpStream,
    peer: SocketAddr,
    mut session: Session,
    engine: &Arc<Engine>,
    config: &SmtpConfig,
) -> std::io::Result<()> {
    if let Next::Upgrade = drive(&mut socket, peer, &mut session, engine, config).await? {
        let Some(tls) = config.tls.clone() else {
            return Ok(());
        };
        let mut stream = tokio_rustls::TlsAcceptor::from(tls).accept(socket).await?;
        session.tls_started();
        drive(&mut stream, peer, &mut session, engine, config).await?;
        let _ = stream.shutdown().await;
    }
    Ok(())
}

async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    peer: SocketAddr,
    session: &mut Session,
    engine: &Arc<Engine>,
    config: &SmtpConfig,
) -> std::io::Result<Next> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        while let Some(out) = session.poll() {
            match out {
                Output::Send(bytes) => pending.extend_from_slice(&bytes),
                Output::Recipient(address) => {
                    let verdict = recipient(engine, &address).await;
                    session.recipient(address, verdict);
                }
                Output::Message(envelope) => {
                    // Replies so far go out before the (durable) write.
                    flush(stream, &mut pending).await?;
                    let verdict =
                        deliver(engine, config, peer, session.tls_active(), envelope).await;
                    session.delivered(verdict);
                }
                Output::StartTls => {
                    flush(stream, &mut pending).await?;
                    return Ok(Next::Upgrade);
                }
                Output::Close => {
                    flush(stream, &mut pending).await?;
                    return Ok(Next::Done);
                }
            }
        }
        flush(stream, &mut pending).await?;
        match tokio::time::timeout(config.idle, stream.read(&mut buf)).await {
            Ok(Ok(0)) => return Ok(Next::Done),
            Ok(Ok(n)) => session.feed(&buf[..n]),
            Ok(Err(e)) => return Err(e),
            Err(_) => session.timed_out(),
        }
    }
}

async fn flush<S: AsyncWrite + Unpin>(
    stream: &mut S,
    pending: &mut Vec<u8>,
) -> std::io::Result<()> {
    if !pending.is_empty() {
        stream.write_all(pending).await?;
        stream.flush().await?;
        pending.clear();
    }
    Ok(())
}

/// Whether a recipient is a tenant's email address. A failing lookup
/// defers (`451`) rather than refusing mail that may be ours.
async fn recipient(engine: &Arc<Engine>, address: &str) -> Verdict {
    match engine.route_address(address).await {
        Ok(Some((tenant, a))) if a.channel == Channel::Email => {
            // The tenant's record brings its current limits.
            if let Err(e) = engine.tenant(&tenant).await {
                tracing::warn!("smtp recipient {address}: {e}");
                return Verdict::Later(451, "temporary failure, try again later".into());
            }
            match engine.capacity().admit_message(&tenant, "email") {
                Ok(()) => Verdict::Accept(String::new()),
                Err(r) => {
                    engine.capacity_refused(
                        &tenant,
                        "email",
                        &r,
                        serde_json::json!({"to": address}),
                    );
                    Verdict::Later(452, format!("{r}: try again later"))
                }
            }
        }
        Ok(_) => Verdict::Refuse(550, format!("no mailbox {address} here")),
        Err(e) => {
            tracing::warn!("smtp recipient {address}: {e}");
            Verdict::Later(451, "temporary failure, try again later".into())
        }
    }
}

/// Stores a message for each recipient; `250` only when all are durable.
async fn deliver(
    engine: &Arc<Engine>,
    config: &SmtpConfig,
    peer: SocketAddr,
    tls: bool,
    mut envelope: Envelope,
) -> Verdict {
    let mut meta = BTreeMap::new();
    if let Some(auth) = &config.auth {
        let v = auth
            .check(peer.ip(), &envelope.helo, &envelope.from, &envelope.data)
            .await;
        if v.reject {
            tracing::info!(
                "smtp {peer}: refused mail from <{}>: DMARC fails and its domain's policy is reject",
                envelope.from
            );
            return Verdict::Denied(format!(
                "rejected by the DMARC policy of {} (spf={}, dkim={}, dmarc={})",
                v.domain, v.spf, v.dkim, v.dmarc
            ));
        }
        // The stored message starts with our findings, as a receiving
        // server writes them (RFC 8601).
        let mut raw = format!("Authentication-Results: {}\r\n", v.header).into_bytes();
        raw.extend_from_slice(&envelope.data);
        envelope.data = raw;
        meta.extend(v.meta());
    }
    let parsed = mime::parse(&envelope.data, &envelope.from);
    let mut text = parsed.text.clone();
    meta.insert("envelope_from".to_string(), envelope.from.clone());
    meta.insert("peer".to_string(), peer.ip().to_string());
    meta.insert("tls".to_string(), tls.to_string());
    if parsed.quoted_cut {
        meta.insert("quoted_cut".into(), "true".into());
    }
    if parsed.is_report {
        meta.insert("report".into(), "delivery-status".into());
    }
    if text.len() > MAX_TEXT_BYTES {
        let mut end = MAX_TEXT_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        meta.insert("truncated".into(), "true".into());
    }
    if text.trim().is_empty() && parsed.attachments.is_empty() {
        text = parsed.subject.clone().unwrap_or_default();
        if text.trim().is_empty() {
            text = "(empty message)".into();
        }
    }
    let mut first = None;
    for rcpt in &envelope.recipients {
        let inbound = Inbound {
            channel: Channel::Email,
            tenant: None,
            from: parsed.from.clone(),
            name: parsed.name.clone(),
            to: rcpt.clone(),
            text: text.clone(),
            subject: parsed.subject.clone(),
            files: parsed.attachments.clone(),
            // A client that retries after losing our 250 sends the same
            // Message-ID: the same message, stored once.
            client_id: parsed.message_id.clone(),
            external_id: parsed.message_id.clone(),
            thread: parsed.thread.clone(),
            own_keys: parsed.message_id.clone().into_iter().collect(),
            meta: meta.clone(),
            raw: Some(envelope.data.clone()),
            // Bounces (a null sender) and auto-replies are kept but never
            // answered (RFC 3834: no mail loops).
            automatic: envelope.from.is_empty() || parsed.is_report || parsed.auto_submitted,
            bounce_of: parsed.bounced_id.clone().map(|id| {
                let why = parsed
                    .bounce_reason
                    .clone()
                    .unwrap_or_else(|| "delivery failed".into());
                (id, why)
            }),
        };
        match engine.receive(inbound).await {
            Ok(r) => {
                first.get_or_insert(r.message.id);
            }
            // The address went away since RCPT: nobody to deliver to.
            Err(EngineError::Core(CoreError::NotFound(_))) => {}
            Err(EngineError::Core(CoreError::Invalid(why))) => {
                return Verdict::Refuse(554, format!("message refused: {why}"));
            }
            // The tenant's storage is full: insufficient storage, for now.
            Err(EngineError::OverLimit(r)) => {
                return Verdict::Later(452, format!("{r}: try again later"));
            }
            Err(e) => {
                tracing::warn!("smtp message for {rcpt}: {e}");
                return Verdict::Later(451, "temporary failure, try again later".into());
            }
        }
    }
    match first {
        Some(id) => Verdict::Accept(id),
        None => Verdict::Refuse(550, "no mailbox here any more".into()),
    }
}
