//! The systemd manager over D-Bus (zbus, zbus_systemd): the few calls the
//! containers need, on the daemon's one tokio runtime. No systemctl.

use anyhow::{Context, Result};
use zbus_systemd::systemd1::{ManagerProxy, UnitProxy};
use zbus_systemd::zbus;

/// The unit operations reconcile needs: [`Systemd`] on a host, a recording
/// fake in tests.
#[allow(async_fn_in_trait)] // used with concrete types only, never as dyn
pub trait UnitManager {
    async fn reload(&self) -> Result<()>;
    async fn start(&self, unit: &str) -> Result<()>;
    async fn restart(&self, unit: &str) -> Result<()>;
    async fn stop(&self, unit: &str) -> Result<()>;
    async fn enable(&self, unit: &str) -> Result<()>;
    async fn disable(&self, unit: &str) -> Result<()>;
    /// `ActiveState` and `SubState`.
    async fn state(&self, unit: &str) -> Result<(String, String)>;
}

pub struct Systemd {
    conn: zbus::Connection,
    manager: ManagerProxy<'static>,
}

impl Systemd {
    /// Connects to the system bus.
    pub async fn connect() -> Result<Systemd> {
        let conn = zbus::Connection::system()
            .await
            .context("cannot connect to the system D-Bus")?;
        let manager = ManagerProxy::new(&conn)
            .await
            .context("cannot reach systemd on D-Bus")?;
        Ok(Systemd { conn, manager })
    }
}

impl UnitManager for Systemd {
    async fn reload(&self) -> Result<()> {
        self.manager
            .reload()
            .await
            .context("systemd daemon-reload failed")
    }

    async fn start(&self, unit: &str) -> Result<()> {
        self.manager
            .start_unit(unit.to_string(), "replace".into())
            .await
            .with_context(|| format!("cannot start {unit}"))?;
        Ok(())
    }

    async fn restart(&self, unit: &str) -> Result<()> {
        self.manager
            .restart_unit(unit.to_string(), "replace".into())
            .await
            .with_context(|| format!("cannot restart {unit}"))?;
        Ok(())
    }

    async fn stop(&self, unit: &str) -> Result<()> {
        self.manager
            .stop_unit(unit.to_string(), "replace".into())
            .await
            .with_context(|| format!("cannot stop {unit}"))?;
        Ok(())
    }

    async fn enable(&self, unit: &str) -> Result<()> {
        self.manager
            .enable_unit_files(vec![unit.to_string()], false, true)
            .await
            .with_context(|| format!("cannot enable {unit}"))?;
        Ok(())
    }

    async fn disable(&self, unit: &str) -> Result<()> {
        self.manager
            .disable_unit_files(vec![unit.to_string()], false)
            .await
            .with_context(|| format!("cannot disable {unit}"))?;
        Ok(())
    }

    /// Loads the unit if needed.
    async fn state(&self, unit: &str) -> Result<(String, String)> {
        let path = self
            .manager
            .load_unit(unit.to_string())
            .await
            .with_context(|| format!("cannot load {unit}"))?;
        let proxy = UnitProxy::builder(&self.conn)
            .path(path)
            .build()
            .await
            .with_context(|| format!("cannot reach {unit} on D-Bus"))?;
        let active = proxy
            .active_state()
            .await
            .with_context(|| format!("cannot read the state of {unit}"))?;
        let sub = proxy
            .sub_state()
            .await
            .with_context(|| format!("cannot read the state of {unit}"))?;
        Ok((active, sub))
    }
}
