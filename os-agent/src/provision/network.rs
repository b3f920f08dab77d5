//! A network-config version 2 (netplan) subset — ethernets with DHCP, static
//! addresses, routes and DNS — rendered as systemd-networkd `.network` files.

use super::cloudconfig::{check_keys, parse_yaml, DocError};
use super::yaml::bool11;
use serde::Deserialize;
use serde_yaml_ng::Value;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

/// Where rendered files go. `10-` sorts before the image's
/// `80-ballast-ethernet.network`, and networkd uses the first file that matches.
pub const NETWORK_DIR: &str = "/etc/systemd/network";

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct NetworkConfig {
    pub version: Option<u32>,
    /// `config: disabled` (cloud-init's "leave the network alone"), or a
    /// version 1 `config:` list, which is refused.
    pub config: Option<Value>,
    pub ethernets: Option<BTreeMap<String, Ethernet>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Ethernet {
    #[serde(rename = "match")]
    pub match_: Option<Match>,
    #[serde(default, deserialize_with = "bool11")]
    pub dhcp4: Option<bool>,
    #[serde(default, deserialize_with = "bool11")]
    pub dhcp6: Option<bool>,
    pub addresses: Option<Vec<String>>,
    pub routes: Option<Vec<Route>>,
    pub gateway4: Option<String>,
    pub gateway6: Option<String>,
    pub nameservers: Option<Nameservers>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Match {
    pub macaddress: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Route {
    pub to: String,
    pub via: String,
    pub metric: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Nameservers {
    pub addresses: Option<Vec<String>>,
    pub search: Option<Vec<String>>,
}

const TOP_KEYS: &[&str] = &["version", "config", "ethernets", "renderer"];
const TOP_UNSUPPORTED: &[&str] = &[
    "bonds", "bridges", "vlans", "wifis", "tunnels", "vrfs", "modems",
];
const ETH_KEYS: &[&str] = &[
    "match",
    "dhcp4",
    "dhcp6",
    "addresses",
    "routes",
    "gateway4",
    "gateway6",
    "nameservers",
];
const ETH_UNSUPPORTED: &[&str] = &[
    "set-name",
    "mtu",
    "optional",
    "wakeonlan",
    "dhcp4-overrides",
    "dhcp6-overrides",
    "accept-ra",
    "link-local",
    "macaddress",
    "critical",
    "routing-policy",
    "ipv6-privacy",
    "ipv6-address-generation",
    "renderer",
];

/// Warnings for keys of a network config (`v`: the mapping with `version`).
pub(crate) fn check_keys_of(v: &Value, path: &str, warnings: &mut Vec<String>) {
    let v = v.get("network").unwrap_or(v);
    check_keys(v, path, TOP_KEYS, TOP_UNSUPPORTED, warnings);
    if let Some(Value::Mapping(eths)) = v.get("ethernets") {
        for (name, e) in eths {
            let name = name.as_str().unwrap_or("?");
            let p = format!("{path}.ethernets.{name}");
            check_keys(e, &p, ETH_KEYS, ETH_UNSUPPORTED, warnings);
            if let Some(m) = e.get("match") {
                check_keys(
                    m,
                    &format!("{p}.match"),
                    &["macaddress", "name"],
                    &["driver"],
                    warnings,
                );
            }
        }
    }
}

/// Parses a separate network-config document: either `network: {version: 2, …}`
/// or the inner mapping itself, as cloud-init's NoCloud accepts both.
pub fn parse_document(text: &str) -> Result<(Option<NetworkConfig>, Value), DocError> {
    #[derive(Deserialize)]
    struct Outer {
        network: Option<NetworkConfig>,
    }
    let value = super::cloudconfig::yaml_value(text, "network-config")?;
    if value.get("network").is_some() {
        let (outer, v): (Outer, Value) = parse_yaml(text, "network-config")?;
        Ok((outer.network, v))
    } else if value.is_null() {
        Ok((None, value))
    } else {
        let (net, v): (NetworkConfig, Value) = parse_yaml(text, "network-config")?;
        Ok((Some(net), v))
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !id.starts_with('.')
}

fn valid_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// `10.0.0.5/24` or `fd00::5/64`.
fn check_cidr(s: &str) -> Result<IpAddr, String> {
    let (ip, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} has no /prefix length"))?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("{s:?}: {ip:?} is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match prefix.parse::<u8>() {
        Ok(p) if p <= max => Ok(ip),
        _ => Err(format!("{s:?}: prefix length must be 0-{max}")),
    }
}

fn check_ip(s: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|_| format!("{s:?} is not an IP address"))
}

/// One rendered file per ethernet: (id, path, contents). Errors are pushed
/// to `errors` with their path in the document.
pub fn render(
    net: &NetworkConfig,
    path: &str,
    errors: &mut Vec<String>,
    warnings: &mut Vec<String>,
) -> Vec<(String, PathBuf, String)> {
    if let Some(Value::String(s)) = &net.config {
        if s == "disabled" {
            return Vec::new();
        }
    }
    match net.version {
        Some(2) => {}
        Some(v) => {
            errors.push(format!(
                "{path}.version: network config version {v} is not supported; use version 2"
            ));
            return Vec::new();
        }
        None => {
            errors.push(format!("{path}.version: missing; Ballast reads version 2"));
            return Vec::new();
        }
    }
    let mut out = Vec::new();
    for (id, e) in net.ethernets.iter().flatten() {
        let p = format!("{path}.ethernets.{id}");
        let before = errors.len();
        if !valid_id(id) {
            errors.push(format!(
                "{p}: {id:?} is not a usable interface id (letters, digits, - _ .)"
            ));
            continue;
        }
        let mut text = format!("# Written by os-agent provision from {p}.\n[Match]\n");
        match &e.match_ {
            Some(m) if m.macaddress.is_some() || m.name.is_some() => {
                if let Some(mac) = &m.macaddress {
                    if valid_mac(mac) {
                        text.push_str(&format!("MACAddress={}\n", mac.to_ascii_lowercase()));
                    } else {
                        errors.push(format!(
                            "{p}.match.macaddress: {mac:?} is not a MAC address"
                        ));
                    }
                }
                if let Some(n) = &m.name {
                    if n.is_empty() || n.contains(char::is_whitespace) {
                        errors.push(format!("{p}.match.name: {n:?} is not an interface name"));
                    }
                    text.push_str(&format!("Name={n}\n"));
                }
            }
            _ => {
                text.push_str(&format!("Name={id}\n"));
            }
        }
        text.push_str("\n[Network]\n");
        let dhcp = match (e.dhcp4.unwrap_or(false), e.dhcp6.unwrap_or(false)) {
            (true, true) => "yes",
            (true, false) => "ipv4",
            (false, true) => "ipv6",
            (false, false) => "no",
        };
        text.push_str(&format!("DHCP={dhcp}\n"));
        let addresses = e.addresses.clone().unwrap_or_default();
        if dhcp == "no" && addresses.is_empty() {
            warnings.push(format!(
                "{p}: neither DHCP nor addresses: the interface gets no address"
            ));
        }
        for (i, a) in addresses.iter().enumerate() {
            match check_cidr(a) {
                Ok(_) => {
                    text.push_str(&format!("Address={a}\n"));
                }
                Err(why) => errors.push(format!("{p}.addresses[{i}]: {why}")),
            }
        }
        for (key, gw, v4) in [
            ("gateway4", &e.gateway4, true),
            ("gateway6", &e.gateway6, false),
        ] {
            if let Some(gw) = gw {
                match check_ip(gw) {
                    Ok(ip) if ip.is_ipv4() == v4 => {
                        text.push_str(&format!("Gateway={gw}\n"));
                    }
                    Ok(_) => errors.push(format!("{p}.{key}: {gw:?} is the wrong address family")),
                    Err(why) => errors.push(format!("{p}.{key}: {why}")),
                }
            }
        }
        if let Some(ns) = &e.nameservers {
            for (i, a) in ns.addresses.iter().flatten().enumerate() {
                match check_ip(a) {
                    Ok(_) => {
                        text.push_str(&format!("DNS={a}\n"));
                    }
                    Err(why) => errors.push(format!("{p}.nameservers.addresses[{i}]: {why}")),
                }
            }
            let search = ns.search.clone().unwrap_or_default();
            if search
                .iter()
                .any(|d| d.is_empty() || d.contains(char::is_whitespace))
            {
                errors.push(format!(
                    "{p}.nameservers.search: a domain is empty or has spaces"
                ));
            } else if !search.is_empty() {
                text.push_str(&format!("Domains={}\n", search.join(" ")));
            }
        }
        for (i, r) in e.routes.iter().flatten().enumerate() {
            let via = match check_ip(&r.via) {
                Ok(ip) => ip,
                Err(why) => {
                    errors.push(format!("{p}.routes[{i}].via: {why}"));
                    continue;
                }
            };
            let to = if r.to == "default" {
                if via.is_ipv4() { "0.0.0.0/0" } else { "::/0" }.to_string()
            } else {
                match check_cidr(&r.to) {
                    Ok(ip) if ip.is_ipv4() == via.is_ipv4() => r.to.clone(),
                    Ok(_) => {
                        errors.push(format!(
                            "{p}.routes[{i}]: to and via are of different address families"
                        ));
                        continue;
                    }
                    Err(why) => {
                        errors.push(format!("{p}.routes[{i}].to: {why}"));
                        continue;
                    }
                }
            };
            text.push_str(&format!("\n[Route]\nDestination={to}\nGateway={}\n", r.via));
            if let Some(m) = r.metric {
                text.push_str(&format!("Metric={m}\n"));
            }
        }
        if errors.len() == before {
            let file = PathBuf::from(format!("{NETWORK_DIR}/10-ballast-{id}.network"));
            out.push((id.clone(), file, text));
        }
    }
    out
}
