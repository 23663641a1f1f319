//! SMP proxying (PRXY/PFWD, RFWD): not implemented yet; answered with `CMD PROHIBITED`.

use muxd_smp::command::{Command, Response};
use muxd_smp::error::{CmdError, ErrorType};
use muxd_smp::transmission::Transmission;

use crate::Shared;

/// Per-connection proxy sessions.
#[derive(Debug, Default)]
pub(crate) struct ProxyState {}

/// Handles a proxy command.
pub(crate) async fn handle(
    _state: &mut ProxyState,
    _shared: &Shared,
    _version: u16,
    _cmd: Command,
    _t: &Transmission<'_>,
) -> Result<Response, ErrorType> {
    Err(ErrorType::Cmd(CmdError::Prohibited))
}
