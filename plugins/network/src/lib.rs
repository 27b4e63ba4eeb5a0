//! Network zone: maps the caller's IP address (`context.ip`) to an
//! operator-defined zone and country, by longest-prefix match over CIDR
//! tables (IPv4 and IPv6).
//!
//! Attributes: `{"zone": "vpn", "country": "FR", "eu": true}`. An address in
//! no table is in `default_zone` / `default_country`. A request without an
//! address is a fault (the failure mode applies): the schema should make
//! `ip` required for the actions this plugin applies to.
//!
//! Configuration:
//! ```json
//! { "zones": [{"name": "on-premises", "cidrs": ["10.0.0.0/8", "fd00:a9e::/32"]}],
//!   "countries": [{"code": "FR", "cidrs": ["90.0.0.0/8"]}],
//!   "eu": ["FR", "DE"], "default_zone": "internet", "default_country": "ZZ" }
//! ```
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::net::IpAddr;

use serde::Deserialize;
use vigie_plugin::{json, Outcome, Request};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    zones: Vec<Zone>,
    #[serde(default)]
    countries: Vec<Country>,
    /// Country codes counted as in the European Union.
    #[serde(default = "eu_members")]
    eu: Vec<String>,
    #[serde(default = "internet")]
    default_zone: String,
    #[serde(default = "unknown_country")]
    default_country: String,
    /// Where the address is in the context.
    #[serde(default = "ip_field")]
    ip_field: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Zone {
    name: String,
    cidrs: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Country {
    code: String,
    cidrs: Vec<String>,
}

fn internet() -> String {
    "internet".into()
}
fn unknown_country() -> String {
    "ZZ".into()
}
fn ip_field() -> String {
    "ip".into()
}
fn eu_members() -> Vec<String> {
    [
        "AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU", "IE",
        "IT", "LT", "LU", "LV", "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK",
    ]
    .iter()
    .map(|c| String::from(*c))
    .collect()
}

/// A CIDR block: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let network: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{text}` is not an IP address or CIDR block"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{text}`: the prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { network, prefix })
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(*ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(*ip) & mask
            }
            _ => false,
        }
    }
}

/// The name of the most specific block containing `ip`.
fn longest_match<'a>(
    ip: &IpAddr,
    tables: impl Iterator<Item = (&'a str, &'a [String])>,
) -> Result<Option<&'a str>, String> {
    let mut best: Option<(&str, u8)> = None;
    for (name, cidrs) in tables {
        for text in cidrs {
            let cidr = Cidr::parse(text)?;
            if cidr.contains(ip) && best.is_none_or(|(_, p)| cidr.prefix > p) {
                best = Some((name, cidr.prefix));
            }
        }
    }
    Ok(best.map(|(name, _)| name))
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) is its IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

pub fn check(request: &Request, config: &Config) -> Result<Outcome, String> {
    let text = request
        .context_str(&config.ip_field)
        .ok_or_else(|| format!("the request has no `context.{}`", config.ip_field))?;
    let ip: IpAddr = text
        .parse()
        .map_err(|_| format!("`context.{}` is not an IP address: {text}", config.ip_field))?;
    let ip = canonical(ip);
    let zone = longest_match(
        &ip,
        config
            .zones
            .iter()
            .map(|z| (z.name.as_str(), z.cidrs.as_slice())),
    )?
    .unwrap_or(&config.default_zone);
    let country = longest_match(
        &ip,
        config
            .countries
            .iter()
            .map(|c| (c.code.as_str(), c.cidrs.as_slice())),
    )?
    .unwrap_or(&config.default_country);
    let eu = config.eu.iter().any(|c| c == country);
    Ok(Outcome::new(
        json!({ "zone": zone, "country": country, "eu": eu }),
    ))
}

vigie_plugin::plugin!(check);

#[cfg(test)]
mod tests {
    use super::*;
    use vigie_plugin::Value;

    fn config() -> Config {
        vigie_plugin::parse(&json!({
            "zones": [
                {"name": "on-premises", "cidrs": ["10.0.0.0/8", "fd00:a9e::/32"]},
                {"name": "vpn", "cidrs": ["10.200.0.0/16"]},
                {"name": "secnumcloud", "cidrs": ["2001:db8:5c::/48", "192.0.2.0/24"]}
            ],
            "countries": [
                {"code": "FR", "cidrs": ["10.0.0.0/8", "192.0.2.0/24", "2001:db8::/32"]},
                {"code": "US", "cidrs": ["198.51.100.0/24"]}
            ]
        }))
        .unwrap()
    }

    fn run(ip: &str) -> Value {
        let req = Request::new("U::\"a\"", "A::\"b\"", "R::\"c\"")
            .with_context(json!({ "ip": { "__extn": { "fn": "ip", "arg": ip } } }));
        Value::Object(check(&req, &config()).unwrap().attributes)
    }

    #[test]
    fn the_most_specific_block_wins() {
        assert_eq!(
            run("10.1.2.3"),
            json!({"zone": "on-premises", "country": "FR", "eu": true})
        );
        assert_eq!(run("10.200.9.9")["zone"], "vpn");
    }

    #[test]
    fn ipv6_ranges() {
        assert_eq!(run("2001:db8:5c:1::7")["zone"], "secnumcloud");
        assert_eq!(run("2001:db8:5d::1")["zone"], "internet");
        assert_eq!(run("2001:db8:5d::1")["country"], "FR");
        assert_eq!(run("fd00:a9e:1::1")["zone"], "on-premises");
        assert_eq!(run("::ffff:10.200.0.1")["zone"], "vpn");
    }

    #[test]
    fn unknown_addresses_fall_back() {
        assert_eq!(
            run("198.51.100.4"),
            json!({"zone": "internet", "country": "US", "eu": false})
        );
        assert_eq!(run("203.0.113.1")["country"], "ZZ");
    }

    #[test]
    fn bad_input_is_named() {
        let req = Request::new("U::\"a\"", "A::\"b\"", "R::\"c\"").with_context(json!({"ip": "x"}));
        assert!(check(&req, &config()).unwrap_err().contains("context.ip"));
        let bad: Config =
            vigie_plugin::parse(&json!({"zones": [{"name": "z", "cidrs": ["10.0.0.0/33"]}]}))
                .unwrap();
        let req = req.with_context(json!({"ip": "10.0.0.1"}));
        assert!(check(&req, &bad).unwrap_err().contains("10.0.0.0/33"));
        assert!(vigie_plugin::parse::<Config>(&json!({"zone": []})).is_err());
    }

    #[test]
    fn cidr_edges() {
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains(&"255.1.1.1".parse().unwrap()));
        assert!(!all.contains(&"::1".parse().unwrap()));
        assert!(Cidr::parse("::/0")
            .unwrap()
            .contains(&"::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.1")
            .unwrap()
            .contains(&"10.0.0.1".parse().unwrap()));
        assert!(!Cidr::parse("10.0.0.1")
            .unwrap()
            .contains(&"10.0.0.2".parse().unwrap()));
    }
}
