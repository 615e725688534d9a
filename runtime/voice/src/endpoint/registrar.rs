//! The registrar: REGISTER with digest authentication (throttled per address
//! and user), bindings read and written off the SIP loop.

use super::*;

/// A REGISTER whose store lookups (tenant, user, current bindings) are done.
pub(crate) struct RegisterLookup {
    id: ServerTxId,
    req: Request,
    info: RequestInfo,
    from: Peer,
    tenant: String,
    user: String,
    /// `None`: no such tenant.
    lookup: Result<Option<UserBindings>, String>,
}

/// A SIP user (if it exists) and its current bindings.
/// A REGISTER whose bindings were written (or could not be).
pub(crate) struct RegisterStored {
    id: ServerTxId,
    req: Request,
    now_ms: u64,
    stored: Result<Vec<Binding>, String>,
}

pub(super) type UserBindings = (Option<plugboard_core::SipUser>, Vec<Binding>);

/// The request's digest credentials for `realm`, if any.
pub(super) fn credentials_for(
    req: &Request,
    realm: &str,
) -> Option<plugboard_sip::digest::Credentials> {
    req.headers
        .all("Authorization")
        .filter_map(parse_credentials)
        .find(|c| c.realm == realm)
}

impl Endpoint {
    /// The registrar (RFC 3261 §10.3) for agents' phones: the To URI's
    /// host names the tenant (the realm), its user the SIP user; digest
    /// with SHA-256 or MD5; bindings live in memory until they expire.
    pub(super) fn register(&mut self, id: ServerTxId, req: Request, info: RequestInfo, from: Peer) {
        let aor = plugboard_sip::Uri::parse(&info.to.uri).ok();
        let (Some(tenant), Some(user)) = (
            aor.as_ref().map(|u| u.host.to_ascii_lowercase()),
            aor.as_ref().and_then(|u| u.user_unescaped()),
        ) else {
            // RFC 4475 unksm2: the AOR must be a SIP URI with a user.
            return self.refuse(
                id,
                &req,
                400,
                Some("the To header must be sip:user@tenant".into()),
            );
        };
        let subject = format!("{user}@{tenant}");
        if self.throttled(id, &req, from, &subject) {
            return;
        }
        // The store is read off the SIP loop; the answer comes back as
        // `Input::Registrar` and continues in `register_looked_up`.
        let app = self.app.clone();
        let inbox = self.inbox.clone();
        tokio::spawn(async move {
            let lookup = async {
                if !app.tenant_exists(&tenant).await? {
                    return Ok(None);
                }
                let stored = app.sip_user(&tenant, &user).await?;
                let bindings = app.bindings(&tenant, &user).await?;
                Ok::<_, plugboard_engine::EngineError>(Some((stored, bindings)))
            }
            .await
            .map_err(|e| e.to_string());
            let looked = RegisterLookup {
                id,
                req,
                info,
                from,
                tenant,
                user,
                lookup,
            };
            let _ = inbox.send(Input::Registrar(Box::new(looked))).await;
        });
    }

    /// The second half of a REGISTER, once the store has answered.
    pub(super) fn register_looked_up(&mut self, r: RegisterLookup) {
        let RegisterLookup {
            id,
            req,
            info,
            from,
            tenant,
            user,
            lookup,
        } = r;
        let now_s = plugboard_core::now_ms() / 1000;
        let (stored, mut bindings) = match lookup {
            Ok(Some(found)) => found,
            Ok(None) => return self.refuse(id, &req, 404, Some(format!("no tenant {tenant}"))),
            Err(e) => {
                // Fail closed: a store error denies.
                tracing::error!("registrar: lookup for {user}@{tenant}: {e}");
                return self.refuse(id, &req, 500, Some("registrar lookup failed".into()));
            }
        };
        let subject = format!("{user}@{tenant}");
        let Some(creds) = credentials_for(&req, &tenant) else {
            return self.challenge(id, &req, &tenant, false);
        };
        let verdict = if creds.username != user {
            Err(AuthError::Bad)
        } else {
            self.auth.verify(&creds, "REGISTER", &tenant, now_s, |alg| {
                stored.as_ref().map(|u| match alg {
                    Algorithm::Md5 => u.ha1_md5.clone(),
                    Algorithm::Sha256 => u.ha1_sha256.clone(),
                })
            })
        };
        match verdict {
            Err(AuthError::Stale) => return self.challenge(id, &req, &tenant, true),
            Err(AuthError::Bad) => {
                self.auth_failed(from, &subject, "register");
                return self.refuse(id, &req, 403, Some("wrong user name or password".into()));
            }
            Ok(()) => self
                .throttle
                .success(from.addr.ip(), &subject, Instant::now()),
        }
        let default_expires: u64 = req
            .headers
            .get("Expires")
            .and_then(|e| e.trim().parse().ok())
            .unwrap_or(3600);
        let now_ms = plugboard_core::now_ms();
        if info.contacts.iter().any(|c| c.uri == "*") {
            if default_expires != 0 || info.contacts.len() != 1 {
                return self.refuse(id, &req, 400, Some("Contact: * needs Expires: 0".into()));
            }
            bindings.clear();
        }
        for c in info.contacts.iter().filter(|c| c.uri != "*") {
            let expires = plugboard_sip::headers::param(&c.params, "expires")
                .flatten()
                .and_then(|e| e.parse::<u64>().ok())
                .unwrap_or(default_expires)
                .min(3600);
            if expires > 0 && expires < 60 {
                let mut r = reply(&req, 423, reason_phrase(423), Some(&random_token()));
                r.headers.push("Min-Expires", "60");
                return self.respond(id, r);
            }
            bindings.retain(|b| b.contact != c.uri);
            if expires > 0 {
                bindings.push(Binding {
                    contact: c.uri.clone(),
                    expires_ms: now_ms + expires * 1000,
                    source: format!("{} {}", from.transport.as_str(), from.addr),
                });
            }
        }
        // Stored (off the loop) before the 200: once the phone is told it
        // is registered, every node sharing the store can reach it. The
        // engine drops expired bindings and answers the live ones.
        let (app, inbox) = (self.app.clone(), self.inbox.clone());
        tokio::spawn(async move {
            let stored = app
                .set_bindings(&tenant, &user, bindings)
                .await
                .map_err(|e| format!("cannot store the registrations of {user}@{tenant}: {e}"));
            let done = RegisterStored {
                id,
                req,
                now_ms,
                stored,
            };
            let _ = inbox.send(Input::Registered(Box::new(done))).await;
        });
    }

    /// The end of a REGISTER: its bindings are stored; 200 with them.
    pub(super) fn register_stored(&mut self, r: RegisterStored) {
        let RegisterStored {
            id,
            req,
            now_ms,
            stored,
        } = r;
        let live = match stored {
            Ok(live) => live,
            Err(e) => {
                tracing::error!("{e}");
                return self.refuse(id, &req, 500, Some("cannot store the registration".into()));
            }
        };
        let mut ok = reply(&req, 200, "OK", Some(&random_token()));
        for b in &live {
            let left = b.expires_ms.saturating_sub(now_ms) / 1000;
            ok.headers
                .push("Contact", format!("<{}>;expires={left}", b.contact));
        }
        self.respond(id, ok);
    }

    /// Refuses (403, unchecked) a request from an address or for a user
    /// that is cooling off after failed authentications; true if it did.
    pub(super) fn throttled(
        &mut self,
        id: ServerTxId,
        req: &Request,
        from: Peer,
        subject: &str,
    ) -> bool {
        match self.throttle.check(from.addr.ip(), subject, Instant::now()) {
            Verdict::Allow => false,
            Verdict::Refuse { until, .. } => {
                self.app.metrics().auth_failure("sip", "refused");
                let left = until.saturating_duration_since(Instant::now()).as_secs() + 1;
                let mut r = reply(req, 403, reason_phrase(403), Some(&random_token()));
                r.headers.push(
                    "Warning",
                    "399 plugboard \"too many failed authentications; try again later\"",
                );
                r.headers.push("Retry-After", left.to_string());
                self.respond(id, r);
                true
            }
        }
    }

    /// Counts a failed authentication; a lockout it starts is a security
    /// event on the operator's stream.
    pub(super) fn auth_failed(&mut self, from: Peer, subject: &str, method: &str) {
        self.app.metrics().auth_failure("sip", "failed");
        for Lockout {
            scope,
            ip,
            user,
            failures,
            cool_off,
        } in self
            .throttle
            .failure(from.addr.ip(), subject, Instant::now())
        {
            self.app.security_event(
                "sip_auth_lockout",
                json!({
                    "scope": match scope { Scope::Address => "address", Scope::User => "user" },
                    "source": ip.to_string(),
                    "user": user,
                    "method": method,
                    "failures": failures,
                    "cool_off_s": cool_off.as_secs(),
                }),
            );
        }
    }

    /// Answers 401 with our digest challenges for `realm` (a tenant id).
    pub(super) fn challenge(&mut self, id: ServerTxId, req: &Request, realm: &str, stale: bool) {
        let now_s = plugboard_core::now_ms() / 1000;
        let mut r = reply(req, 401, reason_phrase(401), Some(&random_token()));
        for c in self.auth.challenges(realm, now_s, stale) {
            r.headers.push("WWW-Authenticate", c);
        }
        self.respond(id, r);
    }
}
