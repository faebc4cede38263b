//! The channel-bound first contact: OPAQUE (an augmented password-authenticated key
//! exchange, RFC 9807's protocol as implemented by `opaque-ke` 3) with the TLS 1.3
//! `tls-exporter` channel binding (RFC 9266) as the key-exchange context.
//!
//! Why not SCRAM-SHA-256-PLUS: SCRAM's client proof is a function of the password and
//! values an eavesdropper sees, so a man in the middle that relays a SCRAM exchange can
//! test password guesses offline against it, even though the channel binding makes it
//! fail. With OPAQUE the messages reveal nothing a guess can be checked against: a man
//! in the middle learns only that the exchange failed, and the server proves itself
//! (KE2) before the client sends its proof (KE3), so the client stops at the first
//! sign of a different channel.

use opaque_ke::{
    ClientLogin, ClientLoginFinishParameters, ClientRegistration,
    ClientRegistrationFinishParameters, CredentialFinalization, CredentialRequest,
    CredentialResponse, RegistrationRequest, ServerLogin, ServerLoginStartParameters,
    ServerRegistration, ServerSetup,
};
use rand::rngs::OsRng;

/// The cipher suite: ristretto255 for the OPRF and the 3DH key exchange, Argon2id
/// (19 MiB, 2 passes) to stretch the password on the client.
pub struct Suite;

impl opaque_ke::CipherSuite for Suite {
    type OprfCs = opaque_ke::Ristretto255;
    type KeGroup = opaque_ke::Ristretto255;
    type KeyExchange = opaque_ke::key_exchange::tripledh::TripleDh;
    type Ksf = argon2::Argon2<'static>;
}

/// The name of the cluster secret holding the server setup (one per cluster: every
/// node must answer with the same keys for the registration records to open).
pub const SETUP_SECRET: &str = "opaque-server-setup-v1";

/// Bound into every exchange together with the TLS exporter value.
const CONTEXT_LABEL: &[u8] = b"impmesh axl first contact v1|";

/// Why an exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PakeError {
    #[error("malformed OPAQUE message")]
    Malformed,
    /// The client could not verify the server's KE2: wrong password, unknown user, or a
    /// different TLS channel on each side (a man in the middle).
    #[error(
        "the server did not prove knowledge of the credential over this TLS channel \
         (wrong user or password, or a man in the middle)"
    )]
    ServerNotAuthenticated,
    /// The server could not verify the client's KE3.
    #[error("the client did not prove knowledge of the credential over this TLS channel")]
    ClientNotAuthenticated,
    #[error("damaged OPAQUE server setup or registration record")]
    Corrupt,
    #[error("OPAQUE failure: {0}")]
    Internal(opaque_ke::errors::ProtocolError),
}

/// A fresh server setup (keys and OPRF seed), serialized.
pub fn new_server_setup() -> Vec<u8> {
    ServerSetup::<Suite>::new(&mut OsRng).serialize().to_vec()
}

/// A loaded server setup.
pub struct Setup(ServerSetup<Suite>);

impl Setup {
    pub fn load(bytes: &[u8]) -> Result<Setup, PakeError> {
        ServerSetup::<Suite>::deserialize(bytes)
            .map(Setup)
            .map_err(|_| PakeError::Corrupt)
    }

    /// Runs both halves of the registration locally (the admin types the password on
    /// this node) and returns the record to store. The password is not kept.
    pub fn register(&self, username: &str, password: &str) -> Result<Vec<u8>, PakeError> {
        let internal = PakeError::Internal;
        let start = ClientRegistration::<Suite>::start(&mut OsRng, password.as_bytes())
            .map_err(internal)?;
        let request =
            RegistrationRequest::deserialize(&start.message.serialize()).map_err(internal)?;
        let response = ServerRegistration::<Suite>::start(&self.0, request, username.as_bytes())
            .map_err(internal)?;
        let finish = start
            .state
            .finish(
                &mut OsRng,
                password.as_bytes(),
                response.message,
                ClientRegistrationFinishParameters::default(),
            )
            .map_err(internal)?;
        Ok(ServerRegistration::<Suite>::finish(finish.message)
            .serialize()
            .to_vec())
    }

    /// The server's answer (KE2) to a client's KE1 on a channel with `exporter`. An
    /// unknown user (`record` `None`) gets an answer indistinguishable from a real one,
    /// which the client then fails to open.
    pub fn server_start(
        &self,
        record: Option<&[u8]>,
        username: &str,
        ke1: &[u8],
        exporter: &[u8],
    ) -> Result<(PendingLogin, Vec<u8>), PakeError> {
        let record = record
            .map(ServerRegistration::<Suite>::deserialize)
            .transpose()
            .map_err(|_| PakeError::Corrupt)?;
        let request =
            CredentialRequest::<Suite>::deserialize(ke1).map_err(|_| PakeError::Malformed)?;
        let context = context(exporter);
        let result = ServerLogin::start(
            &mut OsRng,
            &self.0,
            record,
            request,
            username.as_bytes(),
            ServerLoginStartParameters {
                context: Some(&context),
                identifiers: Default::default(),
            },
        )
        .map_err(PakeError::Internal)?;
        Ok((
            PendingLogin(result.state),
            result.message.serialize().to_vec(),
        ))
    }
}

/// The server's state between KE2 and KE3.
pub struct PendingLogin(ServerLogin<Suite>);

impl PendingLogin {
    /// Checks the client's KE3; `Ok` means the client knows the password and sees the
    /// same TLS channel.
    pub fn finish(self, ke3: &[u8]) -> Result<(), PakeError> {
        let message =
            CredentialFinalization::<Suite>::deserialize(ke3).map_err(|_| PakeError::Malformed)?;
        self.0
            .finish(message)
            .map(|_| ())
            .map_err(|_| PakeError::ClientNotAuthenticated)
    }
}

/// The client's side of a login.
pub struct ClientStart {
    state: ClientLogin<Suite>,
    /// KE1, to send.
    pub ke1: Vec<u8>,
}

impl ClientStart {
    pub fn new(password: &str) -> Result<ClientStart, PakeError> {
        let start = ClientLogin::<Suite>::start(&mut OsRng, password.as_bytes())
            .map_err(PakeError::Internal)?;
        Ok(ClientStart {
            ke1: start.message.serialize().to_vec(),
            state: start.state,
        })
    }

    /// Opens the server's KE2 seen on a channel with `exporter`; returns KE3 to send.
    /// Fails, before anything else is sent, when the server does not know the record
    /// for this password or sits on another TLS channel.
    pub fn finish(self, password: &str, ke2: &[u8], exporter: &[u8]) -> Result<Vec<u8>, PakeError> {
        let response =
            CredentialResponse::<Suite>::deserialize(ke2).map_err(|_| PakeError::Malformed)?;
        let context = context(exporter);
        let result = self
            .state
            .finish(
                password.as_bytes(),
                response,
                ClientLoginFinishParameters::new(Some(&context), Default::default(), None),
            )
            .map_err(|_| PakeError::ServerNotAuthenticated)?;
        Ok(result.message.serialize().to_vec())
    }
}

fn context(exporter: &[u8]) -> Vec<u8> {
    [CONTEXT_LABEL, exporter].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(
        setup: &Setup,
        record: Option<&[u8]>,
        password: &str,
        client_exporter: &[u8],
        server_exporter: &[u8],
    ) -> Result<(), PakeError> {
        let client = ClientStart::new(password)?;
        let (pending, ke2) = setup.server_start(record, "icsync", &client.ke1, server_exporter)?;
        let ke3 = client.finish(password, &ke2, client_exporter)?;
        pending.finish(&ke3)
    }

    #[test]
    fn the_right_password_on_one_channel_succeeds_and_nothing_else_does() {
        let setup = Setup::load(&new_server_setup()).unwrap();
        let record = setup.register("icsync", "correct horse").unwrap();
        let chan = [7u8; 32];
        exchange(&setup, Some(&record), "correct horse", &chan, &chan).unwrap();
        assert_eq!(
            exchange(&setup, Some(&record), "wrong", &chan, &chan),
            Err(PakeError::ServerNotAuthenticated)
        );
        assert_eq!(
            exchange(&setup, Some(&record), "correct horse", &chan, &[8u8; 32]),
            Err(PakeError::ServerNotAuthenticated),
            "a different channel on each side is a man in the middle"
        );
        assert_eq!(
            exchange(&setup, None, "correct horse", &chan, &chan),
            Err(PakeError::ServerNotAuthenticated),
            "an unknown user fails like a wrong password"
        );
        let other = Setup::load(&new_server_setup()).unwrap();
        assert_eq!(
            exchange(&other, Some(&record), "correct horse", &chan, &chan),
            Err(PakeError::ServerNotAuthenticated),
            "a record only opens with the setup that made it"
        );
        assert!(matches!(Setup::load(b"junk"), Err(PakeError::Corrupt)));
    }
}
