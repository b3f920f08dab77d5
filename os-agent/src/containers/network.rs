//! The container's side of a private network, which systemd-nspawn leaves
//! unconfigured: `--network-veth` makes a veth pair, systemd-networkd's
//! `80-container-ve.network` gives the host side (`ve-<name>`) an address of
//! a free /28 (and a DHCP server, forwarding and masquerading), but the
//! image's process runs as PID 2 with no network manager of its own, so
//! `host0` stays down and nspawn's `--port` forwards have nowhere to go.
//!
//! `os-agent container-network <name>` (the unit's `ExecStartPost=`) does
//! what a DHCP client in the container would, inside the container's network
//! namespace (`nsenter`): it brings `host0` up (networkd configures the host
//! side only once it has a carrier), waits for the host side's address, then
//! gives `host0` the next address of that subnet and a default route through
//! the host side. nspawn notices the address and installs the port
//! forwards to it.

use crate::host::{run_ok, Host};
use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long networkd may take to configure the host side.
pub const HOST_SIDE_TIMEOUT: Duration = Duration::from_secs(30);

/// The container's leader PID from machined's record
/// (`/run/systemd/machines/<name>`, `LEADER=<pid>`).
pub fn parse_leader(record: &str, origin: &str) -> Result<u32> {
    let value = record
        .lines()
        .find_map(|l| l.strip_prefix("LEADER="))
        .with_context(|| format!("{origin} has no LEADER="))?;
    value
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|p| *p > 1)
        .with_context(|| format!("{origin}: LEADER={value:?} is not a process id"))
}

/// The host side's interface index: `link_index` of `host0` in the
/// container's `ip -j link show host0` (its sysfs is the host's, so
/// `/sys/class/net/host0/iflink` cannot be read there).
pub fn peer_ifindex(ip_json: &str) -> Result<u32> {
    let v: serde_json::Value =
        serde_json::from_str(ip_json).context("`ip -j link` printed something other than JSON")?;
    v.as_array()
        .and_then(|a| a.first())
        .and_then(|i| i["link_index"].as_u64())
        .and_then(|i| u32::try_from(i).ok())
        .with_context(|| format!("`ip -j link show host0` has no link_index: {ip_json}"))
}

/// The IPv4 address and prefix length of the interface with index
/// `ifindex` in `ip -j addr` output, if it has one yet.
pub fn host_side_address(ip_json: &str, ifindex: u32) -> Result<Option<(Ipv4Addr, u8)>> {
    let v: serde_json::Value =
        serde_json::from_str(ip_json).context("`ip -j addr` printed something other than JSON")?;
    let Some(iface) = v
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["ifindex"].as_u64() == Some(u64::from(ifindex)))
    else {
        return Ok(None);
    };
    for a in iface["addr_info"].as_array().into_iter().flatten() {
        if a["family"] != "inet" {
            continue;
        }
        let (Some(local), Some(prefix)) = (a["local"].as_str(), a["prefixlen"].as_u64()) else {
            continue;
        };
        let addr: Ipv4Addr = local
            .parse()
            .with_context(|| format!("`ip -j addr`: {local:?} is not an IPv4 address"))?;
        let prefix = u8::try_from(prefix)
            .ok()
            .filter(|p| *p <= 32)
            .with_context(|| format!("`ip -j addr`: prefix length {prefix} of {local}"))?;
        return Ok(Some((addr, prefix)));
    }
    Ok(None)
}

/// The container's address: the one after the host side's, which must
/// still be a host address of the subnet (not its broadcast).
pub fn container_address(host: Ipv4Addr, prefix: u8) -> Result<Ipv4Addr> {
    if prefix > 30 {
        bail!("{host}/{prefix} has no room for a second host address");
    }
    let mask = u32::MAX << (32 - prefix);
    let h = u32::from(host);
    let next = h.wrapping_add(1);
    let broadcast = (h & mask) | !mask;
    if next & mask != h & mask || next == broadcast {
        bail!("{host} is the last host address of {host}/{prefix}: no address after it");
    }
    Ok(Ipv4Addr::from(next))
}

/// Configures `host0` of machine `name`; returns the address it got.
pub fn setup(host: &dyn Host, name: &str) -> Result<Ipv4Addr> {
    let record = format!("/run/systemd/machines/{name}");
    let text = host
        .read_to_string(Path::new(&record))
        .with_context(|| format!("cannot read {record} (is machine {name} running?)"))?;
    let leader = parse_leader(&text, &record)?.to_string();
    let netns = |args: &[&str]| -> Result<String> {
        let mut full = vec!["-t", leader.as_str(), "-n", "--"];
        full.extend_from_slice(args);
        run_ok(host, "nsenter", &full)
    };
    let link = netns(&["ip", "-j", "link", "show", "host0"])
        .with_context(|| format!("machine {name} has no host0 (is its network private?)"))?;
    let ifindex = peer_ifindex(&link)?;
    // The host side has no carrier, and networkd gives it no address,
    // until this side is up.
    netns(&["ip", "link", "set", "host0", "up"])?;
    let deadline = Instant::now() + HOST_SIDE_TIMEOUT;
    let (gateway, prefix) = loop {
        let json = run_ok(host, "ip", &["-j", "-4", "addr", "show"])?;
        if let Some(a) = host_side_address(&json, ifindex)? {
            break a;
        }
        if Instant::now() >= deadline {
            bail!(
                "the host side of machine {name}'s veth (ifindex {ifindex}) got no IPv4 address \
                 within {HOST_SIDE_TIMEOUT:?}: is systemd-networkd running with 80-container-ve.network?"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let addr = container_address(gateway, prefix)?;
    let cidr = format!("{addr}/{prefix}");
    let gw = gateway.to_string();
    netns(&["ip", "addr", "replace", &cidr, "dev", "host0"])?;
    netns(&[
        "ip", "route", "replace", "default", "via", &gw, "dev", "host0",
    ])?;
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_from_machined_record() {
        let r = "# This is private data. Do not parse.\nNAME=web\nSCOPE=ballast-container-web.service\nLEADER=505\nCLASS=container\n";
        assert_eq!(parse_leader(r, "m").unwrap(), 505);
        for bad in [
            "NAME=web\n",
            "LEADER=\n",
            "LEADER=abc\n",
            "LEADER=1\n",
            "LEADER=-3\n",
        ] {
            let e = parse_leader(bad, "/run/systemd/machines/web").unwrap_err();
            assert!(
                e.to_string().contains("/run/systemd/machines/web"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn peer_of_host0() {
        let json =
            r#"[{"ifindex":2,"link_index":3,"ifname":"host0","flags":["UP"],"link_netnsid":0}]"#;
        assert_eq!(peer_ifindex(json).unwrap(), 3);
        for bad in [
            "",
            "[]",
            r#"[{"ifindex":2}]"#,
            r#"[{"link_index":-1}]"#,
            "{",
        ] {
            assert!(peer_ifindex(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_side_address_by_ifindex() {
        let json = r#"[{"ifindex":1,"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
            {"ifindex":7,"ifname":"ve-web","addr_info":[{"family":"inet6","local":"fe80::1","prefixlen":64},{"family":"inet","local":"192.168.35.1","prefixlen":28}]},
            {"ifindex":9,"ifname":"ve-api","addr_info":[]}]"#;
        assert_eq!(
            host_side_address(json, 7).unwrap(),
            Some(("192.168.35.1".parse().unwrap(), 28))
        );
        assert_eq!(host_side_address(json, 9).unwrap(), None);
        assert_eq!(host_side_address(json, 42).unwrap(), None);
        assert!(host_side_address("not json", 7).is_err());
        let bad = r#"[{"ifindex":7,"addr_info":[{"family":"inet","local":"x","prefixlen":28}]}]"#;
        assert!(host_side_address(bad, 7).is_err());
        let bad =
            r#"[{"ifindex":7,"addr_info":[{"family":"inet","local":"10.0.0.1","prefixlen":33}]}]"#;
        assert!(host_side_address(bad, 7).is_err());
    }

    #[test]
    fn the_next_address_of_the_subnet() {
        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            container_address(a("192.168.35.1"), 28).unwrap(),
            a("192.168.35.2")
        );
        assert_eq!(
            container_address(a("10.0.0.17"), 28).unwrap(),
            a("10.0.0.18")
        );
        // .14 is the last host address of .0/28 (.15 is broadcast).
        assert!(container_address(a("10.0.0.14"), 28).is_err());
        assert!(container_address(a("10.0.0.15"), 28).is_err());
        assert!(container_address(a("10.0.0.1"), 31).is_err());
        assert_eq!(container_address(a("10.0.0.1"), 30).unwrap(), a("10.0.0.2"));
    }
}
