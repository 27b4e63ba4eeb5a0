//! Envoy ext_authz over gRPC, with a client built from the same protos, and
//! the decision records each answer leaves in the ledger.

use std::collections::HashMap;
use std::path::Path;

use envoy_types::pb::envoy::config::core::v3::{address, Address, Metadata, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value as PbValue};
use serde_json::Value;

use crate::support::{eventually, example_policies, free_port, Ledger, Vigie};

fn config() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/envoy/vigie.toml")
        .to_string_lossy()
        .into_owned()
}

struct Call {
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    spiffe: Option<&'static str>,
    jwt_sub: Option<&'static str>,
    source_ip: &'static str,
}

impl Call {
    fn new(method: &'static str, path: &'static str) -> Call {
        Call {
            method,
            path,
            headers: vec![],
            spiffe: None,
            jwt_sub: None,
            source_ip: "10.1.2.3",
        }
    }
    fn header(mut self, k: &'static str, v: &'static str) -> Call {
        self.headers.push((k, v));
        self
    }
    fn request(&self) -> CheckRequest {
        let mut metadata = None;
        if let Some(sub) = self.jwt_sub {
            let payload = Struct {
                fields: [(
                    "sub".to_owned(),
                    PbValue {
                        kind: Some(Kind::StringValue(sub.into())),
                    },
                )]
                .into(),
            };
            let jwt = Struct {
                fields: [(
                    "jwt_payload".to_owned(),
                    PbValue {
                        kind: Some(Kind::StructValue(payload)),
                    },
                )]
                .into(),
            };
            metadata = Some(Metadata {
                filter_metadata: [("envoy.filters.http.jwt_authn".to_owned(), jwt)].into(),
                ..Default::default()
            });
        }
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: self.source_ip.into(),
                            ..Default::default()
                        })),
                    }),
                    principal: self.spiffe.unwrap_or("").into(),
                    ..Default::default()
                }),
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: self.method.into(),
                        path: self.path.into(),
                        headers: self
                            .headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect::<HashMap<_, _>>(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                metadata_context: metadata,
                ..Default::default()
            }),
        }
    }
}

struct Answer {
    code: i32,
    http_status: Option<i32>,
    headers: HashMap<String, String>,
    body: String,
}

fn answer(r: CheckResponse) -> Answer {
    let mut headers = HashMap::new();
    let mut http_status = None;
    let mut body = String::new();
    match r.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            for h in ok.headers.into_iter().filter_map(|h| h.header) {
                headers.insert(h.key, h.value);
            }
        }
        Some(HttpResponse::DeniedResponse(d)) => {
            http_status = d.status.map(|s| s.code);
            body = d.body;
            for h in d.headers.into_iter().filter_map(|h| h.header) {
                headers.insert(h.key, h.value);
            }
        }
        _ => {}
    }
    Answer {
        code: r.status.map_or(-1, |s| s.code),
        http_status,
        headers,
        body,
    }
}

#[test]
fn envoy_checks_are_answered_and_logged() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (side, led) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ledger = Ledger::start(led.path(), "127.0.0.1:0");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let v = Vigie::start_in(
        &example_policies(),
        side.path(),
        &[
            "--config",
            &config(),
            "--ext-authz-listen",
            &listen,
            "--ledger",
            &ledger.url(),
            "--sidecar-id",
            "mesh-1",
        ],
        &[
            ("VIGIE_AUDIT_BATCH_MAX_DELAY_MS", "20"),
            ("VIGIE_AUDIT_MAX_BACKOFF_MS", "300"),
            ("VIGIE_CACHE_ENABLED", "false"),
        ],
    );
    // The sidecar enrolls itself here: take its public key from its status.
    let key = v.get("/v1/status").json()["log"]["public_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = std::process::Command::new(crate::support::BIN)
        .args([
            "ledger",
            "enroll",
            "--id",
            "mesh-1",
            "--public-key",
            &key,
            "--data-dir",
        ])
        .arg(led.path())
        .output()
        .unwrap();
    assert!(out.status.success());

    let results = rt.block_on(async {
        let client = AuthorizationClient::connect(format!("http://{listen}"))
            .await
            .unwrap();
        let check = |c: Call| {
            let mut client = client.clone();
            async move { answer(client.check(c.request()).await.unwrap().into_inner()) }
        };
        let header_allow =
            check(Call::new("GET", "/records/social-001").header("x-vigie-user", "alice")).await;
        let header_deny =
            check(Call::new("GET", "/records/finance-001").header("x-vigie-user", "alice")).await;
        let jwt = check(Call {
            jwt_sub: Some("bob"),
            ..Call::new("GET", "/records/finance-001")
        })
        .await;
        let spiffe = check(Call {
            spiffe: Some("spiffe://agency.example/user/alice"),
            ..Call::new("GET", "/records/social-001")
        })
        .await;
        let foreign_spiffe = check(Call {
            spiffe: Some("spiffe://elsewhere/user/alice"),
            ..Call::new("GET", "/records/social-001")
        })
        .await;
        let no_route =
            check(Call::new("DELETE", "/records/social-001").header("x-vigie-user", "alice")).await;
        let risky = check(
            Call::new("GET", "/records/social-001?full=1")
                .header("x-vigie-user", "alice")
                .header("x-risk-score", "0.95"),
        )
        .await;
        let blocked = check(Call {
            source_ip: "203.0.113.9",
            ..Call::new("GET", "/records/social-001").header("x-vigie-user", "alice")
        })
        .await;
        let bad_header = check(
            Call::new("GET", "/records/social-001")
                .header("x-vigie-user", "alice")
                .header("x-risk-score", "high"),
        )
        .await;
        let malformed = client
            .clone()
            .check(CheckRequest { attributes: None })
            .await;
        let after =
            check(Call::new("GET", "/records/social-001").header("x-vigie-user", "alice")).await;
        // The caller's trace context rides in the gRPC metadata.
        let mut traced = tonic::Request::new(
            Call::new("GET", "/records/social-001")
                .header("x-vigie-user", "alice")
                .request(),
        );
        traced.metadata_mut().insert(
            "traceparent",
            "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let traced = answer(client.clone().check(traced).await.unwrap().into_inner());

        let channel = tonic::transport::Channel::from_shared(format!("http://{listen}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let serving = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "envoy.service.auth.v3.Authorization".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        (
            header_allow,
            header_deny,
            jwt,
            spiffe,
            foreign_spiffe,
            no_route,
            risky,
            blocked,
            bad_header,
            malformed,
            after,
            serving,
            traced,
        )
    });
    let (
        header_allow,
        header_deny,
        jwt,
        spiffe,
        foreign_spiffe,
        no_route,
        risky,
        blocked,
        bad_header,
        malformed,
        after,
        serving,
        traced,
    ) = results;

    assert_eq!(header_allow.code, 0);
    assert_eq!(
        header_allow
            .headers
            .get("x-authorized-by")
            .map(String::as_str),
        Some("vigie")
    );
    assert_eq!(header_deny.code, 7);
    assert_eq!(header_deny.http_status, Some(403));
    assert_eq!(header_deny.body, "access denied by policy\n");
    assert_eq!(jwt.code, 0, "bob, from a verified JWT, reads finance");
    assert_eq!(spiffe.code, 0);
    assert_eq!(
        foreign_spiffe.code, 7,
        "another trust domain yields no identity"
    );
    assert_eq!(
        foreign_spiffe.headers["x-vigie-reason"],
        "ext_authz_no_identity"
    );
    assert_eq!(no_route.code, 7);
    assert_eq!(no_route.headers["x-vigie-reason"], "ext_authz_no_route");
    assert_eq!(risky.headers["x-vigie-reason"], "forbid-high-risk");
    assert_eq!(blocked.headers["x-vigie-reason"], "forbid-blocked-ranges");
    assert_eq!(bad_header.code, 7);
    assert_eq!(
        bad_header.headers["x-vigie-reason"],
        "ext_authz_invalid_request"
    );
    let status = malformed.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    assert_eq!(
        after.code, 0,
        "the sidecar keeps answering after a malformed request"
    );
    assert_eq!(serving, 1, "SERVING");

    // Every answer left a decision record, with its reason.
    assert!(
        eventually(20, || v.get("/v1/status").json()["log"]["outbox"]
            ["pending"]
            == 0),
        "{}",
        v.log()
    );
    for (a, reason) in [
        (&header_allow, "staff-read-department"),
        (&no_route, "ext_authz_no_route"),
        (&foreign_spiffe, "ext_authz_no_identity"),
        (&bad_header, "ext_authz_invalid_request"),
    ] {
        let id = &a.headers["x-vigie-decision-id"];
        let rec: Value = ledger.get(&format!("/v1/decisions/{id}")).json();
        assert_eq!(rec["record"]["reasons"][0], reason, "{rec}");
    }
    let rec: Value = ledger
        .get(&format!(
            "/v1/decisions/{}",
            traced.headers["x-vigie-decision-id"]
        ))
        .json();
    assert_eq!(
        rec["record"]["trace_id"], "5bf92f3577b34da6a3ce929d0e0e4736",
        "{rec}"
    );
    let rec: Value = ledger
        .get(&format!(
            "/v1/decisions/{}",
            no_route.headers["x-vigie-decision-id"]
        ))
        .json();
    assert_eq!(
        rec["record"]["request"]["principal"],
        "Agency::User::\"alice\""
    );
    assert_eq!(rec["record"]["decision"], "Deny");
}

#[test]
fn a_mapping_that_does_not_fit_the_schema_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[ext_authz]\nenabled = true\nlisten = \"127.0.0.1:0\"\n[[ext_authz.identity]]\nsource = \"header\"\nname = \"x-user\"\nentity_type = \"Agency::Usr\"\n[[ext_authz.routes]]\nmethod = \"GET\"\npath = \"/r/{id}\"\naction = \"fly\"\nresource_type = \"Agency::Record\"\nresource_id = \"{name}\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(crate::support::BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            cfg.to_str().unwrap(),
            "--data-dir",
            dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("`Agency::Usr` is not in the schema"), "{err}");
    assert!(
        err.contains("action `Agency::Action::\"fly\"` is not in the schema"),
        "{err}"
    );
    assert!(
        err.contains("names a parameter the path does not have"),
        "{err}"
    );
}

#[test]
fn plugins_run_on_envoy_checks() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let v = Vigie::start(
        &example_policies(),
        &["--config", &config(), "--ext-authz-listen", &listen],
        &[("VIGIE_PLUGINS_ENABLED", "true")],
    );
    // Administration: a hardware-key MFA token (mfa plugin, from the
    // x-id-token header) and an on-premises address (network plugin, from
    // the peer's address).
    let token: &'static str = Box::leak(
        crate::plugins::id_token("ES256", &crate::plugins::mfa_claims(&["pwd", "hwk"], 30))
            .into_boxed_str(),
    );
    let (on_premises, vpn, no_token) = rt.block_on(async {
        let client = AuthorizationClient::connect(format!("http://{listen}"))
            .await
            .unwrap();
        let check = |c: Call| {
            let mut client = client.clone();
            async move { answer(client.check(c.request()).await.unwrap().into_inner()) }
        };
        let admin = || {
            Call::new("POST", "/systems/payroll/admin")
                .header("x-vigie-user", "eve")
                .header("x-id-token", token)
        };
        (
            check(admin()).await,
            check(Call {
                source_ip: "10.200.0.7",
                ..admin()
            })
            .await,
            check(Call::new("POST", "/systems/payroll/admin").header("x-vigie-user", "eve")).await,
        )
    });
    assert_eq!(on_premises.code, 0, "allowed: {}", on_premises.body);
    assert_eq!(vpn.http_status, Some(403));
    assert_eq!(no_token.http_status, Some(403));
    let m = v.get("/metrics").text;
    assert!(
        m.contains("vigie_plugin_calls_total{plugin=\"network\",result=\"ok\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("vigie_endpoint_decisions_total{endpoint=\"ext_authz\",decision=\"allow\"} 1"),
        "{m}"
    );
}
