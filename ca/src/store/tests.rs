//! One behaviour suite, run against SQLite always and against PostgreSQL when `TRUSTLINE_TEST_POSTGRES` holds a
//! conninfo (scripts/test.sh starts a real server and sets it).

use super::*;

fn sel(s: &str) -> Selector {
    s.parse().unwrap()
}

fn entry(id: &str, spiffe: &str, parent: &str, sels: &[&str]) -> Entry {
    Entry {
        id: id.into(),
        spiffe_id: spiffe.into(),
        parent_id: parent.into(),
        selectors: sels.iter().map(|s| sel(s)).collect(),
        x509_svid_ttl: 0,
        jwt_svid_ttl: 0,
        dns_names: vec!["a.example.org".into()],
        admin: false,
        revision: 0,
        created_at: 100,
    }
}

fn key(id: &str, kind: KeyKind, state: KeyState, created: i64) -> CaKeyRecord {
    CaKeyRecord {
        id: id.into(),
        kind,
        state,
        key_type: "ec-p256".into(),
        key_ref: "soft:v1:xxx".into(),
        certificate: (kind == KeyKind::X509).then(|| vec![1, 2, 3]),
        public_key_spki: vec![4, 5, 6],
        not_before: 0,
        not_after: 1000,
        created_at: created,
        activated_at: None,
        retired_at: None,
    }
}

fn issued(serial: &str, key: &str, at: i64, not_after: i64) -> IssuedRecord {
    IssuedRecord {
        serial: serial.into(),
        spiffe_id: "spiffe://example.org/w".into(),
        kind: KeyKind::X509,
        issued_at: at,
        not_after,
        signing_key_id: key.into(),
        requested_by: "admin".into(),
    }
}

async fn suite(s: &Store) {
    assert_eq!(s.schema_version().await.unwrap(), SCHEMA_VERSION);

    // Entries: create, duplicate (order-independent selectors), filters, update, delete, revisions.
    let r0 = s.entries_revision().await.unwrap();
    let a = s
        .create_entry(&entry(
            "a",
            "spiffe://example.org/web",
            "spiffe://example.org/n1",
            &["unix:uid:1", "unix:gid:2"],
        ))
        .await
        .unwrap();
    assert!(a.revision > r0);
    assert_eq!(
        a.selectors,
        vec![sel("unix:gid:2"), sel("unix:uid:1")],
        "stored canonically"
    );
    let dup = s
        .create_entry(&entry(
            "b",
            "spiffe://example.org/web",
            "spiffe://example.org/n1",
            &["unix:gid:2", "unix:uid:1"],
        ))
        .await
        .unwrap_err();
    match dup {
        StoreError::DuplicateEntry { existing_id, .. } => assert_eq!(existing_id, "a"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        s.entries_revision().await.unwrap(),
        a.revision,
        "failed create changed nothing"
    );
    let mut b = entry(
        "b",
        "spiffe://example.org/db",
        "spiffe://example.org/n2",
        &["unix:uid:5"],
    );
    b.created_at = 200;
    let b = s.create_entry(&b).await.unwrap();
    assert_eq!(
        s.list_entries(&EntryFilter::default()).await.unwrap(),
        vec![a.clone(), b.clone()]
    );
    assert_eq!(
        s.list_entries_by_parent("spiffe://example.org/n2").await.unwrap(),
        vec![b.clone()]
    );
    let by_sel = s
        .list_entries(&EntryFilter {
            selector: Some(sel("unix:uid:1")),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_sel, vec![a.clone()]);
    let by_id = s
        .list_entries(&EntryFilter {
            spiffe_id: Some("spiffe://example.org/db".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_id, vec![b.clone()]);
    let mut changed = b.clone();
    changed.x509_svid_ttl = 60;
    changed.created_at = 999; // ignored: creation time is kept
    let updated = s.update_entry(&changed).await.unwrap();
    assert!(updated.revision > b.revision);
    assert_eq!(updated.created_at, 200);
    assert_eq!(s.get_entry("b").await.unwrap().unwrap(), updated);
    // Update into a duplicate is refused and changes nothing.
    let mut clash = updated.clone();
    clash.spiffe_id = a.spiffe_id.clone();
    clash.parent_id = a.parent_id.clone();
    clash.selectors = a.selectors.clone();
    assert!(matches!(
        s.update_entry(&clash).await,
        Err(StoreError::DuplicateEntry { .. })
    ));
    assert_eq!(s.get_entry("b").await.unwrap().unwrap(), updated);
    assert!(matches!(
        s.update_entry(&entry(
            "zz",
            "spiffe://example.org/x",
            "spiffe://example.org/n",
            &["unix:uid:1"]
        ))
        .await,
        Err(StoreError::EntryNotFound(_))
    ));
    let rev = s.entries_revision().await.unwrap();
    let deleted = s.delete_entry("a").await.unwrap();
    assert_eq!(deleted.id, "a");
    assert!(s.entries_revision().await.unwrap() > rev);
    assert!(s.get_entry("a").await.unwrap().is_none());
    assert!(matches!(
        s.delete_entry("a").await,
        Err(StoreError::EntryNotFound(_))
    ));

    // Join tokens: once only; expired ones are refused (and removed); unknown ones too.
    let t = JoinToken {
        token: "tok1".into(),
        agent_spiffe_id: "spiffe://example.org/agent".into(),
        expires_at: 1000,
        created_at: 0,
    };
    s.create_join_token(&t).await.unwrap();
    assert_eq!(s.consume_join_token("tok1", 10).await.unwrap(), t);
    assert!(matches!(
        s.consume_join_token("tok1", 10).await,
        Err(StoreError::TokenNotFound)
    ));
    s.create_join_token(&JoinToken {
        token: "tok2".into(),
        ..t.clone()
    })
    .await
    .unwrap();
    assert!(matches!(
        s.consume_join_token("tok2", 5000).await,
        Err(StoreError::TokenExpired { expires_at: 1000 })
    ));
    assert!(matches!(
        s.consume_join_token("tok2", 10).await,
        Err(StoreError::TokenNotFound)
    ));
    s.create_join_token(&JoinToken {
        token: "tok3".into(),
        ..t.clone()
    })
    .await
    .unwrap();
    assert_eq!(s.prune_join_tokens(5000).await.unwrap(), 1);

    // Nodes.
    let mut n = NodeRecord {
        spiffe_id: "spiffe://example.org/agent".into(),
        attestation_type: "join_token".into(),
        serial: "01".into(),
        expires_at: 10,
        created_at: 1,
        updated_at: 1,
    };
    s.upsert_node(&n).await.unwrap();
    n.serial = "02".into();
    n.updated_at = 2;
    s.upsert_node(&n).await.unwrap();
    assert_eq!(s.get_node(&n.spiffe_id).await.unwrap().unwrap(), n);
    assert!(s.get_node("spiffe://example.org/none").await.unwrap().is_none());

    // CA keys: slots, activation race, retirement, bundle sequence.
    let seq0 = s.bundle_sequence().await.unwrap();
    s.insert_ca_key(&key("k1", KeyKind::X509, KeyState::Prepared, 1))
        .await
        .unwrap();
    assert!(s.bundle_sequence().await.unwrap() > seq0);
    assert!(matches!(
        s.insert_ca_key(&key("k2", KeyKind::X509, KeyState::Prepared, 2))
            .await,
        Err(StoreError::KeySlotTaken { .. })
    ));
    s.insert_ca_key(&key("j1", KeyKind::Jwt, KeyState::Prepared, 3))
        .await
        .unwrap();
    assert!(s.activate_ca_key(KeyKind::X509, "k1", 50).await.unwrap());
    assert!(
        !s.activate_ca_key(KeyKind::X509, "k1", 51).await.unwrap(),
        "second activation loses the race"
    );
    s.insert_ca_key(&key("k2", KeyKind::X509, KeyState::Prepared, 4))
        .await
        .unwrap();
    let seq1 = s.bundle_sequence().await.unwrap();
    assert!(s.activate_ca_key(KeyKind::X509, "k2", 60).await.unwrap());
    assert!(s.bundle_sequence().await.unwrap() > seq1);
    let keys = s.list_ca_keys().await.unwrap();
    let states: Vec<_> = keys.iter().map(|k| (k.id.as_str(), k.state)).collect();
    assert_eq!(
        states,
        vec![
            ("k1", KeyState::Old),
            ("j1", KeyState::Prepared),
            ("k2", KeyState::Active)
        ]
    );
    assert_eq!(keys[2].activated_at, Some(60));
    assert_eq!(keys[0].certificate, Some(vec![1, 2, 3]));
    s.retire_ca_key("k1", 70).await.unwrap();
    assert!(matches!(
        s.retire_ca_key("k1", 71).await,
        Err(StoreError::KeyNotFound(_))
    ));
    assert_eq!(s.list_ca_keys().await.unwrap()[0].retired_at, Some(70));

    // Issuance record: batches are all-or-nothing, newest first, filters, limits, max not-after per key.
    s.record_issued(&[
        issued("s1", "k2", 10, 100),
        issued("s2", "k2", 11, 300),
        issued("s3", "k1", 12, 200),
    ])
    .await
    .unwrap();
    let err = s
        .record_issued(&[issued("s4", "k2", 13, 900), issued("s1", "k2", 13, 900)])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::DuplicateSerial(ref x) if x == "s1"),
        "{err:?}"
    );
    let all = s.list_issued(&IssuedFilter::default()).await.unwrap();
    let serials: Vec<_> = all.iter().map(|r| r.serial.as_str()).collect();
    assert_eq!(
        serials,
        vec!["s3", "s2", "s1"],
        "s4 was rolled back with its batch"
    );
    let one = s
        .list_issued(&IssuedFilter {
            serial: Some("s2".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(one, vec![issued("s2", "k2", 11, 300)]);
    assert_eq!(
        s.list_issued(&IssuedFilter {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .len(),
        1
    );
    assert_eq!(s.max_not_after_signed_by("k2").await.unwrap(), Some(300));
    assert_eq!(s.max_not_after_signed_by("none").await.unwrap(), None);
}

#[tokio::test]
async fn sqlite_store_behaves() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.db");
    let s = Store::open(&StoreConfig::Sqlite { path: path.clone() })
        .await
        .unwrap();
    suite(&s).await;
    let entries = s.list_entries(&EntryFilter::default()).await.unwrap();
    drop(s);
    // Reopen: everything is still there and the migration is not re-applied.
    let s = Store::open(&StoreConfig::Sqlite { path: path.clone() })
        .await
        .unwrap();
    assert_eq!(s.list_entries(&EntryFilter::default()).await.unwrap(), entries);
    assert_eq!(s.schema_version().await.unwrap(), SCHEMA_VERSION);
    // A database from the future is refused.
    if let Store::Sqlite(inner) = &s {
        inner.bump_schema_for_test();
    }
    drop(s);
    let err = Store::open(&StoreConfig::Sqlite { path }).await.unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 999, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn postgres_store_behaves() {
    let Ok(conninfo) = std::env::var("TRUSTLINE_TEST_POSTGRES") else {
        println!("skipped: TRUSTLINE_TEST_POSTGRES is not set (scripts/test.sh sets it)");
        return;
    };
    let db = format!("tl_store_{}_{}", std::process::id(), crate::x509::now_unix());
    let (admin, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let base: Vec<&str> = conninfo
        .split_whitespace()
        .filter(|p| !p.starts_with("dbname="))
        .collect();
    let dsn = format!("{} dbname={db}", base.join(" "));
    let s = Store::open(&StoreConfig::Postgres {
        conninfo: dsn.clone(),
    })
    .await
    .unwrap();
    suite(&s).await;
    // Two replicas opening the same database concurrently migrate once and both work.
    let cfg = StoreConfig::Postgres {
        conninfo: dsn.clone(),
    };
    let (a, b) = tokio::join!(Store::open(&cfg), Store::open(&cfg));
    let (a, b) = (a.unwrap(), b.unwrap());
    a.insert_ca_key(&key("p1", KeyKind::Jwt, KeyState::Prepared, 9))
        .await
        .unwrap_err();
    assert_eq!(
        a.bundle_sequence().await.unwrap(),
        b.bundle_sequence().await.unwrap()
    );
    drop((s, a, b));
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
}
