//! os-agent
