//! Host ports for QEMU's user-mode network forwards.

use std::io;
use std::net::{Ipv4Addr, TcpListener};

/// A TCP port on 127.0.0.1 that was free a moment ago. The listener is
/// dropped before QEMU binds it, so the port can be taken in between: the
/// caller retries with a fresh port when QEMU cannot set up the forward.
pub fn pick_free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Whether QEMU's stderr says a host forward could not bind its port.
pub(crate) fn is_hostfwd_collision(qemu_stderr: &str) -> bool {
    qemu_stderr.contains("host forwarding rule") || qemu_stderr.contains("Address already in use")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picked_port_is_nonzero_and_bindable() {
        let port = pick_free_port().unwrap();
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
    }

    #[test]
    fn picks_differ_while_held() {
        let held = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let held_port = held.local_addr().unwrap().port();
        for _ in 0..20 {
            assert_ne!(pick_free_port().unwrap(), held_port);
        }
    }

    #[test]
    fn recognises_collision() {
        assert!(is_hostfwd_collision(
            "qemu-system-x86_64: -netdev user,id=n0,hostfwd=tcp:127.0.0.1:22-:22: \
             Could not set up host forwarding rule 'tcp:127.0.0.1:22-:22'"
        ));
        assert!(!is_hostfwd_collision(
            "qemu-system-x86_64: terminating on signal 15"
        ));
    }
}
