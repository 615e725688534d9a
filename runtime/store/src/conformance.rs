//! The conformance suite every [`Store`] implementation must pass: the
//! same checks run against sled and PostgreSQL (`tests/store.rs`). Each
//! check returns an error naming what went wrong; [`run`] runs them all.

use crate::{RecordWrite, Result as StoreResult, Store, hash_key};
use plugboard_core::{
    Address, Binding, Channel, EntryKind, Error, FlowRef, Grants, HttpGrant, Interaction,
    InteractionState, PluginKind, PluginVersion, SipUser, Tenant, TimelineEntry, Trunk,
};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A failed check.
pub type Failure = String;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!("{}:{}: {}", file!(), line!(), format!($($msg)+)));
        }
    };
}

fn ok<T>(r: StoreResult<T>, what: &str) -> Result<T, Failure> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// A tenant record named `id`.
pub fn tenant(id: &str) -> Tenant {
    Tenant {
        id: id.into(),
        name: id.into(),
        time_zone: "UTC".into(),
        created_ms: 1,
        limits: Default::default(),
        retention: Default::default(),
    }
}

fn version(name: &str, sha: &str) -> PluginVersion {
    PluginVersion {
        name: name.into(),
        version: 0,
        kind: PluginKind::Flow,
        sha256: sha.into(),
        size: 3,
        created_ms: 1,
        document: None,
    }
}

/// An interaction of `tenant` from `from` on `channel`, created at `at`.
pub fn interaction(tenant: &str, id: &str, from: &str, channel: Channel) -> Interaction {
    Interaction {
        id: id.into(),
        tenant: tenant.into(),
        channel,
        from: from.into(),
        to: "100".into(),
        flow: Some(FlowRef {
            name: "ivr".into(),
            version: 1,
        }),
        state: InteractionState::InFlow,
        attributes: BTreeMap::new(),
        simulated: false,
        created_ms: 1,
        closed_ms: None,
        timeline: Vec::new(),
        timeline_base: 0,
    }
}

/// A timeline entry of `kind` at `n` ms, with `n` in its data.
pub fn entry(kind: EntryKind, n: u64) -> TimelineEntry {
    TimelineEntry {
        at_ms: n,
        kind,
        data: json!({"n": n}),
    }
}

/// Runs every check on a fresh, empty store.
pub async fn run(s: Arc<dyn Store>) -> Result<(), Failure> {
    tenants(&*s).await?;
    plugins(&*s).await?;
    addresses(&*s).await?;
    registrar(&*s).await?;
    interactions(&*s).await?;
    kv_and_blobs(&*s).await?;
    secrets(&*s).await?;
    records(&*s).await?;
    deletion(&*s).await?;
    concurrent_writers(s).await?;
    Ok(())
}

/// Tenants and keys: creation is all or nothing, ids are unique.
pub async fn tenants(s: &dyn Store) -> Result<(), Failure> {
    ok(
        s.create_tenant(&tenant("a"), &hash_key("ka")).await,
        "create a",
    )?;
    ok(
        s.create_tenant(&tenant("b"), &hash_key("kb")).await,
        "create b",
    )?;
    let again = s.create_tenant(&tenant("a"), &hash_key("other")).await;
    ensure!(
        matches!(again, Err(Error::Conflict(_))),
        "second a: {again:?}"
    );
    // The refused creation stored no key.
    ensure!(
        ok(s.tenant_for_key(&hash_key("other")).await, "key")?.is_none(),
        "a refused tenant's key was stored"
    );
    ensure!(
        ok(s.tenant_for_key(&hash_key("kb")).await, "key b")? == Some("b".into()),
        "key b"
    );
    let mut a = tenant("a");
    a.name = "Acme".into();
    ok(s.update_tenant(&a).await, "update")?;
    ensure!(
        ok(s.tenant("a").await, "tenant a")?.map(|t| t.name) == Some("Acme".into()),
        "update lost"
    );
    let missing = s.update_tenant(&tenant("zz")).await;
    ensure!(matches!(missing, Err(Error::NotFound(_))), "{missing:?}");
    let ids: Vec<String> = ok(s.tenants().await, "tenants")?
        .into_iter()
        .map(|t| t.id)
        .collect();
    ensure!(ids == ["a", "b"], "tenants {ids:?}");
    Ok(())
}

/// Plugin versions with their blobs, rollback, grants, configs, isolation.
pub async fn plugins(s: &dyn Store) -> Result<(), Failure> {
    let v1 = ok(
        s.add_plugin_version("a", version("ivr", "h1"), b"one")
            .await,
        "v1",
    )?;
    let v2 = ok(
        s.add_plugin_version("a", version("ivr", "h2"), b"two")
            .await,
        "v2",
    )?;
    ensure!(
        v1.version == 1 && v2.version == 2,
        "numbering {v1:?} {v2:?}"
    );
    ensure!(
        ok(s.plugin_bytes("a", "h2").await, "bytes")? == Some(b"two".to_vec()),
        "blob"
    );
    let p = ok(s.plugin("a", "ivr").await, "plugin")?;
    ensure!(p.as_ref().map(|p| p.active_version) == Some(2), "{p:?}");
    ensure!(
        ok(s.set_active_version("a", "ivr", None).await, "rollback")? == 1,
        "rollback"
    );
    let again = s.set_active_version("a", "ivr", None).await;
    ensure!(
        matches!(again, Err(Error::Conflict(_))),
        "nothing before 1: {again:?}"
    );
    ensure!(
        ok(s.set_active_version("a", "ivr", Some(2)).await, "forward")? == 2,
        "roll forward"
    );
    let bad = s.set_active_version("a", "ivr", Some(9)).await;
    ensure!(matches!(bad, Err(Error::NotFound(_))), "{bad:?}");
    let grants = Grants {
        http: Some(HttpGrant {
            allow: vec!["crm:80".into()],
            ..HttpGrant::default()
        }),
        kv: true,
        secrets: vec!["crm".into()],
    };
    ok(s.set_grants("a", "ivr", &grants).await, "grants")?;
    ok(s.set_config("a", "ivr", &json!({"x": 1})).await, "config")?;
    ensure!(
        ok(s.config("a", "ivr").await, "config")? == json!({"x": 1}),
        "config"
    );
    ensure!(
        ok(s.config("a", "none").await, "config")?.is_null(),
        "no config"
    );
    let p = ok(s.plugin("a", "ivr").await, "plugin")?;
    ensure!(p.as_ref().map(|p| &p.grants) == Some(&grants), "{p:?}");
    let unknown = s.set_grants("a", "nope", &grants).await;
    ensure!(matches!(unknown, Err(Error::NotFound(_))), "{unknown:?}");
    // Another tenant sees none of it.
    ensure!(
        ok(s.plugin("b", "ivr").await, "b")?.is_none(),
        "b sees a's plugin"
    );
    ensure!(
        ok(s.plugin_bytes("b", "h1").await, "b")?.is_none(),
        "b sees a's blob"
    );
    ok(
        s.add_plugin_version("a", version("tts", "h3"), b"3").await,
        "tts",
    )?;
    let names: Vec<String> = ok(s.plugins("a").await, "plugins")?
        .into_iter()
        .map(|p| p.name)
        .collect();
    ensure!(names == ["ivr", "tts"], "{names:?}");
    let nobody = s.plugins("nobody").await;
    ensure!(matches!(nobody, Err(Error::NotFound(_))), "{nobody:?}");
    Ok(())
}

/// An address belongs to one tenant.
pub async fn addresses(s: &dyn Store) -> Result<(), Failure> {
    let addr = |flow: &str| Address {
        address: "100".into(),
        channel: Channel::Voice,
        flow: flow.into(),
    };
    ok(s.set_address("a", &addr("ivr")).await, "claim")?;
    let claim = s.set_address("b", &addr("other")).await;
    ensure!(matches!(claim, Err(Error::Conflict(_))), "{claim:?}");
    ensure!(
        ok(s.address("b", "100").await, "b")?.is_none(),
        "b got a's address"
    );
    ok(s.set_address("a", &addr("menu")).await, "update")?;
    let owner = ok(s.address_owner("100").await, "owner")?;
    ensure!(
        owner.map(|(t, a)| (t, a.flow)) == Some(("a".into(), "menu".into())),
        "owner"
    );
    ensure!(
        ok(s.address_owner("200").await, "none")?.is_none(),
        "200 owned"
    );
    ensure!(ok(s.addresses("a").await, "list")?.len() == 1, "list");
    Ok(())
}

/// SIP users, trunks, registrations.
pub async fn registrar(s: &dyn Store) -> Result<(), Failure> {
    let user = SipUser {
        name: "alice".into(),
        ha1_md5: "m".into(),
        ha1_sha256: "s".into(),
        created_ms: 1,
    };
    ok(s.set_sip_user("a", &user).await, "user")?;
    ensure!(
        ok(s.sip_user("a", "alice").await, "user")? == Some(user.clone()),
        "user"
    );
    ensure!(
        ok(s.sip_user("b", "alice").await, "b")?.is_none(),
        "b has alice"
    );
    ensure!(ok(s.sip_users("a").await, "users")?.len() == 1, "users");
    let trunk = Trunk {
        name: "default".into(),
        host: "carrier:5060".into(),
        transport: "udp".into(),
        username: Some("u".into()),
        password: Some("p".into()),
        inbound_ips: vec!["127.0.0.9".into()],
        inbound_digest: false,
        t38: false,
    };
    ok(s.set_trunk("a", &trunk).await, "trunk")?;
    ensure!(ok(s.trunks("a").await, "trunks")? == vec![trunk], "trunks");
    ensure!(ok(s.trunks("b").await, "b")?.is_empty(), "b has a's trunk");
    let b = Binding {
        contact: "sip:alice@127.0.0.1:5070".into(),
        expires_ms: 99,
        source: "UDP 127.0.0.1:5070".into(),
    };
    ok(
        s.set_bindings("a", "alice", std::slice::from_ref(&b)).await,
        "bind",
    )?;
    ensure!(
        ok(s.user_bindings("a", "alice").await, "get")? == vec![b.clone()],
        "binding"
    );
    ensure!(
        ok(s.bindings("a").await, "all")? == vec![("alice".to_string(), vec![b])],
        "bindings"
    );
    ok(s.set_bindings("a", "alice", &[]).await, "unbind")?;
    ensure!(ok(s.bindings("a").await, "all")?.is_empty(), "unbind");
    Ok(())
}

/// Header + append-only timeline, indexes by state and customer.
pub async fn interactions(s: &dyn Store) -> Result<(), Failure> {
    let mut ix = interaction("a", "ix-0000000000001-00000001", "+370600", Channel::Voice);
    ix.timeline.push(entry(EntryKind::Event, 1));
    let stored = ok(s.save_interaction(&ix, 0).await, "save")?;
    ensure!(stored == 1, "stored {stored}");
    ix.timeline.push(entry(EntryKind::Actions, 2));
    ix.timeline.push(entry(EntryKind::Event, 3));
    ix.attributes.insert("menu".into(), "sales".into());
    let stored = ok(s.save_interaction(&ix, stored).await, "append")?;
    ensure!(stored == 3, "stored {stored}");
    let back = ok(s.interaction("a", &ix.id).await, "load")?;
    ensure!(back.as_ref() == Some(&ix), "round trip: {back:?}");
    // The header alone knows how many entries are stored; what is pushed
    // on it is appended after them.
    let mut head = ok(s.interaction_head("a", &ix.id).await, "head")?.ok_or("no head")?;
    ensure!(
        head.timeline.is_empty() && head.timeline_base == 3 && head.attributes == ix.attributes,
        "head {head:?}"
    );
    for n in 4..16 {
        head.push(EntryKind::Log, serde_json::json!(n));
    }
    let appended = ok(
        s.save_interaction(&head, head.timeline_base).await,
        "append head",
    )?;
    ensure!(appended == 15, "stored {appended}");
    let whole = ok(s.interaction("a", &ix.id).await, "load")?.ok_or("gone")?;
    ensure!(
        whole.timeline[..3] == ix.timeline[..]
            && whole.timeline[3..]
                .iter()
                .map(|e| e.data.clone())
                .collect::<Vec<_>>()
                == (4..16).map(|n| serde_json::json!(n)).collect::<Vec<_>>(),
        "{:?}",
        whole.timeline
    );
    let head = ok(s.interaction_head("a", &ix.id).await, "head")?;
    ensure!(
        head.as_ref().map(|h| h.timeline_base) == Some(15),
        "{head:?}"
    );
    ensure!(
        ok(s.interaction_head("b", &ix.id).await, "b")?.is_none()
            && ok(s.interaction_head("a", "ix-none").await, "none")?.is_none(),
        "a head that is not there"
    );
    ix.timeline = whole.timeline;
    let stored = appended;
    // Open interactions are a query on the state index.
    let open = ok(
        s.interactions_in_state("a", InteractionState::InFlow, 10)
            .await,
        "open",
    )?;
    ensure!(open.len() == 1 && open[0].id == ix.id, "open {open:?}");
    ix.state = InteractionState::Closed;
    ix.closed_ms = Some(5);
    ok(s.save_interaction(&ix, stored).await, "close")?;
    let open = ok(
        s.interactions_in_state("a", InteractionState::InFlow, 10)
            .await,
        "open",
    )?;
    ensure!(open.is_empty(), "closed still open: {open:?}");
    let closed = ok(
        s.interactions_in_state("a", InteractionState::Closed, 10)
            .await,
        "closed",
    )?;
    ensure!(
        closed.len() == 1 && closed[0].timeline.is_empty(),
        "{closed:?}"
    );
    // A customer's history across channels, newest first; not another's.
    // A soft write is a write like any other, only not waited for.
    let chat = interaction("a", "ix-0000000000002-00000002", "+370600", Channel::Chat);
    ok(s.save_interaction_soft(&chat, 0).await, "soft")?;
    ensure!(
        ok(s.interaction("a", &chat.id).await, "soft")?.as_ref() == Some(&chat),
        "a soft write is not there"
    );
    let other = interaction("a", "ix-0000000000003-00000003", "+370699", Channel::Voice);
    ok(s.save_interaction(&chat, 0).await, "chat")?;
    ok(s.save_interaction(&other, 0).await, "other")?;
    let history = ok(s.customer_history("a", "+370600", 10).await, "history")?;
    let ids: Vec<&str> = history.iter().map(|i| i.id.as_str()).collect();
    ensure!(ids == [chat.id.as_str(), ix.id.as_str()], "history {ids:?}");
    let newest = ok(s.interactions("a", 2).await, "list")?;
    let ids: Vec<&str> = newest.iter().map(|i| i.id.as_str()).collect();
    ensure!(
        ids == [other.id.as_str(), chat.id.as_str()],
        "newest {ids:?}"
    );
    ensure!(
        ok(s.interaction("b", &ix.id).await, "b")?.is_none(),
        "b sees a's"
    );
    ensure!(
        ok(s.customer_history("b", "+370600", 10).await, "b")?.is_empty(),
        "b"
    );
    Ok(())
}

/// The plugins' kv and blobs, per tenant.
pub async fn kv_and_blobs(s: &dyn Store) -> Result<(), Failure> {
    ok(s.kv_set("a", "k", b"1").await, "set")?;
    ensure!(
        ok(s.kv_get("a", "k").await, "get")? == Some(b"1".to_vec()),
        "kv"
    );
    ensure!(
        ok(s.kv_get("b", "k").await, "b")?.is_none(),
        "b sees a's kv"
    );
    ok(s.kv_delete("a", "k").await, "delete")?;
    ensure!(ok(s.kv_get("a", "k").await, "get")?.is_none(), "deleted");
    ok(s.put_blob("a", "rec-1", b"wav").await, "blob")?;
    let again = s.put_blob("a", "rec-1", b"other").await;
    ensure!(matches!(again, Err(Error::Conflict(_))), "{again:?}");
    ensure!(
        ok(s.blob("a", "rec-1").await, "blob")? == Some(b"wav".to_vec()),
        "blob"
    );
    ensure!(
        ok(s.blob("b", "rec-1").await, "b")?.is_none(),
        "b sees a's blob"
    );
    Ok(())
}

/// Deletion (retention, erasure): an interaction goes with its timeline
/// and index keys, kv keys by prefix, blobs, every record of a kind; the
/// other tenant's data with the same names stays.
pub async fn deletion(s: &dyn Store) -> Result<(), Failure> {
    for t in ["da", "db"] {
        ok(s.create_tenant(&tenant(t), &hash_key(t)).await, "tenant")?;
    }
    for t in ["da", "db"] {
        for (id, from) in [
            ("ix-0000000000100-00000001", "+4411"),
            ("ix-0000000000200-00000002", "+4422"),
            ("ix-0000000000300-00000003", "+4411"),
        ] {
            let mut ix = interaction(t, id, from, Channel::Voice);
            ix.push(EntryKind::Call, json!({}));
            ix.push(EntryKind::Log, json!({"n": 1}));
            ok(s.save_interaction(&ix, 0).await, "save")?;
        }
    }
    let ids = |v: Vec<Interaction>| v.into_iter().map(|i| i.id).collect::<Vec<_>>();
    let old = ok(
        s.interactions_between("da", "", "ix-0000000000300", 10)
            .await,
        "between",
    )?;
    ensure!(
        ids(old) == ["ix-0000000000100-00000001", "ix-0000000000200-00000002"],
        "created before 300, oldest first"
    );
    let page = ok(
        s.interactions_between("da", "ix-0000000000100-00000001", "ix-9", 1)
            .await,
        "page",
    )?;
    ensure!(ids(page) == ["ix-0000000000200-00000002"], "the next page");
    ensure!(
        ok(
            s.delete_interaction("da", "ix-0000000000100-00000001")
                .await,
            "delete"
        )?,
        "there was one"
    );
    ensure!(
        !ok(
            s.delete_interaction("da", "ix-0000000000100-00000001")
                .await,
            "again"
        )?,
        "twice"
    );
    ensure!(
        ok(
            s.interaction("da", "ix-0000000000100-00000001").await,
            "get"
        )?
        .is_none(),
        "deleted"
    );
    let history = ok(s.customer_history("da", "+4411", 10).await, "history")?;
    ensure!(
        ids(history) == ["ix-0000000000300-00000003"],
        "the customer index lost it"
    );
    let open = ok(
        s.interactions_in_state("da", InteractionState::InFlow, 10)
            .await,
        "state",
    )?;
    ensure!(open.len() == 2, "the state index lost it: {}", open.len());
    let b = ok(s.interaction("db", "ix-0000000000100-00000001").await, "b")?;
    ensure!(
        b.is_some_and(|i| i.timeline.len() == 2),
        "b's interaction of the same id stays whole"
    );
    // Several at once; one not there is not counted.
    let batch = [
        "ix-0000000000200-00000002".to_string(),
        "ix-0000000000300-00000003".to_string(),
        "ix-missing".to_string(),
    ];
    ensure!(
        ok(s.delete_interactions("da", &batch).await, "batch")? == 2,
        "two deleted"
    );
    ensure!(
        ok(s.customer_history("da", "+4411", 10).await, "history")?.is_empty()
            && ok(s.customer_history("da", "+4422", 10).await, "history")?.is_empty(),
        "their index keys went too"
    );
    // A new interaction of the same id starts with an empty timeline.
    let again = interaction("da", "ix-0000000000100-00000001", "+4433", Channel::Sms);
    ok(s.save_interaction(&again, 0).await, "save again")?;
    let got = ok(
        s.interaction("da", "ix-0000000000100-00000001").await,
        "get",
    )?;
    ensure!(
        got.is_some_and(|i| i.timeline.is_empty() && i.from == "+4433"),
        "no old timeline under a new record"
    );

    for t in ["da", "db"] {
        for k in ["cust/7/name", "cust/7/notes", "cust/70/name", "other"] {
            ok(s.kv_set(t, k, b"v").await, "kv")?;
        }
    }
    ensure!(
        ok(s.kv_delete_prefix("da", "cust/7/").await, "prefix")? == 2,
        "two keys under cust/7/"
    );
    ensure!(
        ok(s.kv_get("da", "cust/7/name").await, "get")?.is_none(),
        "gone"
    );
    ensure!(
        ok(s.kv_get("da", "cust/70/name").await, "get")?.is_some(),
        "cust/70 stays"
    );
    ensure!(
        ok(s.kv_get("da", "other").await, "get")?.is_some(),
        "other stays"
    );
    ensure!(
        ok(s.kv_get("db", "cust/7/name").await, "get")?.is_some(),
        "b's stays"
    );
    ensure!(
        matches!(s.kv_delete_prefix("da", "").await, Err(Error::Invalid(_))),
        "an empty prefix would be every key"
    );

    ok(s.put_blob("da", "rec-del", b"wav").await, "blob")?;
    ok(s.put_blob("db", "rec-del", b"wav").await, "blob")?;
    ensure!(
        ok(s.delete_blob("da", "rec-del").await, "delete blob")?,
        "there was one"
    );
    ensure!(
        ok(s.blob("da", "rec-del").await, "get")?.is_none(),
        "blob gone"
    );
    ensure!(
        ok(s.blob("db", "rec-del").await, "get")?.is_some(),
        "b's blob stays"
    );
    ensure!(!ok(s.delete_blob("da", "rec-del").await, "again")?, "twice");

    for t in ["da", "db"] {
        for id in ["m1", "m2"] {
            ok(
                s.set_record(t, "conv/x", id, &json!({"t": id})).await,
                "rec",
            )?;
        }
        ok(s.set_record(t, "conv/xy", "m1", &json!({})).await, "rec")?;
    }
    ensure!(
        ok(s.delete_kind("da", "conv/x").await, "kind")? == 2,
        "two records"
    );
    ensure!(
        ok(s.records("da", "conv/x").await, "list")?.is_empty(),
        "kind gone"
    );
    ensure!(
        ok(s.records("da", "conv/xy").await, "list")?.len() == 1,
        "conv/xy stays"
    );
    ensure!(
        ok(s.records("db", "conv/x").await, "list")?.len() == 2,
        "b's stay"
    );
    Ok(())
}

/// Sealed secrets: per tenant, replaced in place, listed by name.
pub async fn secrets(s: &dyn Store) -> Result<(), Failure> {
    ok(s.set_secret("a", "crm", b"sealed-1").await, "set")?;
    ok(s.set_secret("a", "crm", b"sealed-2").await, "replace")?;
    ok(s.set_secret("a", "billing", b"sealed-3").await, "set")?;
    ensure!(
        ok(s.secret("a", "crm").await, "get")? == Some(b"sealed-2".to_vec()),
        "replaced"
    );
    ensure!(
        ok(s.secret_names("a").await, "names")? == vec!["billing".to_string(), "crm".to_string()],
        "names"
    );
    ensure!(
        ok(s.secret("b", "crm").await, "b")?.is_none(),
        "b sees a's secret"
    );
    ensure!(
        ok(s.secret_names("b").await, "b names")?.is_empty(),
        "b names"
    );
    ensure!(
        ok(s.delete_secret("a", "billing").await, "delete")?,
        "deleted"
    );
    ensure!(
        !ok(s.delete_secret("a", "billing").await, "again")?,
        "deleted twice"
    );
    ensure!(
        ok(s.secret_names("a").await, "names")? == vec!["crm".to_string()],
        "names after delete"
    );
    let missing = s.secret_names("nobody").await;
    ensure!(
        matches!(missing, Err(Error::NotFound(_))),
        "unknown tenant: {missing:?}"
    );
    Ok(())
}

/// Configuration records: per tenant and kind, replaced in place.
pub async fn records(s: &dyn Store) -> Result<(), Failure> {
    ok(
        s.set_record("a", "queue", "sales", &json!({"id": "sales", "v": 1}))
            .await,
        "set",
    )?;
    ok(
        s.set_record("a", "queue", "sales", &json!({"id": "sales", "v": 2}))
            .await,
        "replace",
    )?;
    ok(
        s.set_record("a", "queue", "billing", &json!({"id": "billing"}))
            .await,
        "set",
    )?;
    ok(
        s.set_record(
            "a",
            "agent",
            "sales",
            &json!({"id": "sales", "agent": true}),
        )
        .await,
        "other kind",
    )?;
    ensure!(
        ok(s.record("a", "queue", "sales").await, "get")? == Some(json!({"id": "sales", "v": 2})),
        "replaced"
    );
    let queues = ok(s.records("a", "queue").await, "list")?;
    ensure!(
        queues == vec![json!({"id": "billing"}), json!({"id": "sales", "v": 2})],
        "by id, one kind: {queues:?}"
    );
    ensure!(
        ok(s.records("b", "queue").await, "b")?.is_empty(),
        "b sees a's records"
    );
    ensure!(
        ok(s.record("b", "queue", "sales").await, "b")?.is_none(),
        "b sees a's record"
    );
    ensure!(
        ok(s.delete_record("a", "queue", "billing").await, "delete")?,
        "deleted"
    );
    ensure!(
        !ok(s.delete_record("a", "queue", "billing").await, "again")?,
        "deleted twice"
    );
    ensure!(
        ok(s.records("a", "queue").await, "list")?.len() == 1,
        "one left"
    );
    // A log: a batch at once, then read page by page in id order.
    let batch: Vec<(String, serde_json::Value)> = (0..25u32)
        .rev()
        .map(|n| (format!("{n:06}"), json!({"n": n})))
        .collect();
    ok(s.set_records("a", "event", &batch).await, "batch")?;
    let first = ok(s.records_after("a", "event", "", 10).await, "page 1")?;
    ensure!(
        first.len() == 10 && first[0] == ("000000".to_string(), json!({"n": 0})),
        "first page: {first:?}"
    );
    let rest = ok(
        s.records_after("a", "event", &first[9].0, 100).await,
        "page 2",
    )?;
    ensure!(
        rest.len() == 15 && rest[0].0 == "000010" && rest[14].0 == "000024",
        "rest: {rest:?}"
    );
    ensure!(
        ok(s.records_after("a", "event", "000024", 10).await, "end")?.is_empty(),
        "nothing after the last"
    );
    ensure!(
        ok(s.records_after("a", "queue", "", 10).await, "kind")?.len() == 1,
        "only that kind"
    );
    ensure!(
        ok(s.records_after("b", "event", "", 10).await, "b")?.is_empty(),
        "b sees a's log"
    );
    // Several kinds at once, guarded: the first write wins, a retry
    // finds it and writes nothing.
    let writes = [
        RecordWrite::put("client_id", "c1", json!({"message": "m1"})),
        RecordWrite::put("msg/ix1", "m1", json!({"text": "hi"})),
        RecordWrite::put("pending", "m1", json!({"ix": "ix1"})),
        RecordWrite::delete("queue", "sales"),
    ];
    ensure!(
        ok(
            s.apply_records("a", &writes, Some(("client_id", "c1")))
                .await,
            "apply"
        )?
        .is_none(),
        "a first write finds nothing"
    );
    ensure!(
        ok(s.record("a", "msg/ix1", "m1").await, "get")? == Some(json!({"text": "hi"}))
            && ok(s.record("a", "pending", "m1").await, "get")?.is_some()
            && ok(s.record("a", "queue", "sales").await, "get")?.is_none(),
        "every write of the batch is there"
    );
    let retry = [
        RecordWrite::put("client_id", "c1", json!({"message": "m2"})),
        RecordWrite::put("msg/ix1", "m2", json!({"text": "hi"})),
    ];
    let found = ok(
        s.apply_records("a", &retry, Some(("client_id", "c1")))
            .await,
        "retry",
    )?;
    ensure!(
        found == Some(json!({"message": "m1"})),
        "a retry finds the first: {found:?}"
    );
    ensure!(
        ok(s.record("a", "msg/ix1", "m2").await, "get")?.is_none(),
        "a guarded retry writes nothing"
    );
    ensure!(
        ok(s.records("a", "msg/ix1").await, "list")?.len() == 1,
        "a kind with a slash lists its own records"
    );
    ok(
        s.apply_records("a", &[RecordWrite::delete("pending", "m1")], None)
            .await,
        "delete",
    )?;
    ensure!(
        ok(s.record("a", "pending", "m1").await, "get")?.is_none(),
        "deleted in a batch"
    );
    ensure!(
        ok(s.record("b", "msg/ix1", "m1").await, "b")?.is_none(),
        "b sees a's batch"
    );
    ensure!(
        s.apply_records("nobody", &writes, None).await.is_err(),
        "a batch for a missing tenant fails"
    );
    Ok(())
}

/// Many writers at once: every acknowledged write is there.
pub async fn concurrent_writers(s: Arc<dyn Store>) -> Result<(), Failure> {
    let mut tasks = Vec::new();
    for n in 0..200u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut ix = interaction(
                "b",
                &format!("ix-{:013}-{n:08x}", 100 + n),
                "+1",
                Channel::Sms,
            );
            ix.timeline.push(entry(EntryKind::Event, u64::from(n)));
            s.save_interaction(&ix, 0).await
        }));
    }
    for t in tasks {
        ok(t.await.map_err(|e| e.to_string())?, "write")?;
    }
    let all = ok(s.interactions("b", 1000).await, "list")?;
    ensure!(all.len() == 200, "{} of 200", all.len());
    ensure!(all.iter().all(|i| i.timeline.len() == 1), "timelines");
    // Guarded record writes at once: 10 ids, each sent by 20 writers.
    // Exactly one write per id lands; the others get its value.
    let mut tasks = Vec::new();
    for n in 0..200u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("c{}", n % 10);
            let writes = [
                RecordWrite::put("cw_guard", &id, json!({"by": n})),
                RecordWrite::put("cw_msg", format!("{id}-{n}"), json!({"by": n})),
            ];
            let first = s
                .apply_records("b", &writes, Some(("cw_guard", &id)))
                .await?;
            Ok::<_, Error>((n, first))
        }));
    }
    let mut winners = BTreeMap::new();
    let mut answers = Vec::new();
    for t in tasks {
        let (n, first) = ok(t.await.map_err(|e| e.to_string())?, "guarded write")?;
        match first {
            None => {
                ensure!(
                    winners.insert(n % 10, n).is_none(),
                    "two writes of c{} landed",
                    n % 10
                );
            }
            Some(v) => answers.push((n, v)),
        }
    }
    ensure!(
        winners.len() == 10,
        "{} of 10 guarded writes landed",
        winners.len()
    );
    for (n, v) in answers {
        ensure!(v["by"] == winners[&(n % 10)], "writer {n} was answered {v}");
    }
    let msgs = ok(s.records("b", "cw_msg").await, "messages")?;
    ensure!(
        msgs.len() == 10,
        "{} messages of the 10 winners",
        msgs.len()
    );
    Ok(())
}
