//! Fake destination servers that speak the real wire formats (see ../shared/api/).

pub mod hubspot;
pub mod salesforce;
pub mod slack;
pub mod webhook;
