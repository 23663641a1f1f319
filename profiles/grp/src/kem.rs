//! ML-KEM-768 (FIPS 203) as GRP uses it: the client's per-connection key pair and the
//! relay's encapsulation, whose shared secret becomes the Noise `psk2` (§5.4).
//!
//! Seeds (`d`, `z` for key generation, `m` for encapsulation) are always drawn from the RNG the
//! caller passes in, so the crate never reads OS randomness and tests can replay the vectors.

use std::fmt;

use ml_kem::kem::{Decapsulate, DecapsulationKey, EncapsulationKey};
use ml_kem::{B32, EncapsulateDeterministic, EncodedSizeUser, KemCore, MlKem768, MlKem768Params};
use rand_core::{CryptoRng, RngCore};
use zeroize::Zeroizing;

/// `EK_LEN`: the encoded encapsulation key.
pub const EK_LEN: usize = 1184;

/// `CT_LEN`: the ciphertext.
pub const CT_LEN: usize = 1088;

/// The shared secret (and therefore the PSK) length.
pub const SS_LEN: usize = 32;

/// Why an encapsulation key was refused (§5.5, relay step 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KemError {
    /// The key is not [`EK_LEN`] bytes (the FIPS 203 type check).
    #[error("encapsulation key of {0} bytes")]
    Length(usize),
    /// A decoded coefficient is not below 3329 (the FIPS 203 modulus check).
    #[error("encapsulation key fails the modulus check")]
    Modulus,
}

/// The client's ML-KEM-768 key pair for one handshake. The decapsulation key is zeroized on
/// drop (ml-kem's `zeroize` feature), which is how `dk` gets erased after decapsulation.
pub struct KemKeyPair {
    dk: DecapsulationKey<MlKem768Params>,
    ek: Box<[u8; EK_LEN]>,
}

impl KemKeyPair {
    /// A fresh key pair: `d` then `z` are drawn from `rng` (FIPS 203 `ML-KEM.KeyGen`).
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let mut d = Zeroizing::new([0u8; 32]);
        let mut z = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(d.as_mut());
        rng.fill_bytes(z.as_mut());
        Self::from_seeds(&d, &z)
    }

    /// The key pair of `ML-KEM.KeyGen_internal(d, z)`.
    pub fn from_seeds(d: &[u8; 32], z: &[u8; 32]) -> Self {
        let (dk, ek) = MlKem768::generate_deterministic(&B32::from(*d), &B32::from(*z));
        let mut ek_bytes = Box::new([0u8; EK_LEN]);
        ek_bytes.copy_from_slice(ek.as_bytes().as_slice());
        Self { dk, ek: ek_bytes }
    }

    /// The encoded encapsulation key, as sent in payload 1.
    pub fn encapsulation_key(&self) -> &[u8; EK_LEN] {
        &self.ek
    }

    /// The FIPS 203 encoding of the decapsulation key (2400 bytes; vectors hash it).
    pub fn decapsulation_key_bytes(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.dk.as_bytes().to_vec())
    }

    /// `ML-KEM.Decaps(dk, ct)`. Never fails: a wrong ciphertext yields the implicit-rejection
    /// key, so the mismatch only shows when the Noise tag of message 2 fails.
    pub fn decapsulate(&self, ct: &[u8; CT_LEN]) -> Zeroizing<[u8; SS_LEN]> {
        let ct = ml_kem::Ciphertext::<MlKem768>::from(*ct);
        let mut out = Zeroizing::new([0u8; SS_LEN]);
        // ml-kem 0.2 declares `Result<_, ()>` but its decapsulation cannot fail; an error would
        // leave an all-zero PSK, which fails the handshake rather than weakening it.
        if let Ok(ss) = self.dk.decapsulate(&ct) {
            out.copy_from_slice(ss.as_slice());
        }
        out
    }
}

impl fmt::Debug for KemKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KemKeyPair").finish_non_exhaustive()
    }
}

/// A received encapsulation key that passed the FIPS 203 §7.2 input checks.
pub struct CheckedEncapsulationKey(EncapsulationKey<MlKem768Params>);

impl CheckedEncapsulationKey {
    /// Type check (length) and modulus check: decoding and re-encoding must give the same
    /// bytes, which fails exactly when some 12-bit coefficient is 3329 or more.
    ///
    /// ml-kem 0.2 reduces coefficients while decoding instead of refusing them, so the check is
    /// done here by comparing the round trip.
    pub fn new(ek: &[u8]) -> Result<Self, KemError> {
        let arr = ml_kem::Encoded::<EncapsulationKey<MlKem768Params>>::try_from(ek)
            .map_err(|_| KemError::Length(ek.len()))?;
        let key = EncapsulationKey::<MlKem768Params>::from_bytes(&arr);
        if key.as_bytes().as_slice() != ek {
            return Err(KemError::Modulus);
        }
        Ok(Self(key))
    }

    /// `ML-KEM.Encaps(ek)` with `m` drawn from `rng`.
    pub fn encapsulate(
        &self,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> (Box<[u8; CT_LEN]>, Zeroizing<[u8; SS_LEN]>) {
        let mut m = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(m.as_mut());
        self.encapsulate_with(&m)
    }

    /// `ML-KEM.Encaps_internal(ek, m)`: deterministic, for known-answer tests.
    pub fn encapsulate_with(&self, m: &[u8; 32]) -> (Box<[u8; CT_LEN]>, Zeroizing<[u8; SS_LEN]>) {
        let mut ct = Box::new([0u8; CT_LEN]);
        let mut ss = Zeroizing::new([0u8; SS_LEN]);
        // Declared fallible but infallible in ml-kem 0.2 (see `decapsulate`).
        if let Ok((c, k)) = self.0.encapsulate_deterministic(&B32::from(*m)) {
            ct.copy_from_slice(c.as_slice());
            ss.copy_from_slice(k.as_slice());
        }
        (ct, ss)
    }
}

impl fmt::Debug for CheckedEncapsulationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckedEncapsulationKey")
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;

    #[test]
    fn round_trip_and_checks() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let kp = KemKeyPair::generate(&mut rng);
        let ek = CheckedEncapsulationKey::new(kp.encapsulation_key()).unwrap();
        let (ct, ss) = ek.encapsulate(&mut rng);
        assert_eq!(*kp.decapsulate(&ct), *ss);
        // A flipped ciphertext bit gives the implicit-rejection key, not the secret.
        let mut bad = *ct;
        bad[100] ^= 1;
        assert_ne!(*kp.decapsulate(&bad), *ss);

        assert_eq!(
            CheckedEncapsulationKey::new(&kp.encapsulation_key()[..100]).err(),
            Some(KemError::Length(100))
        );
        // First coefficient set to 0xfff (>= 3329): the modulus check must refuse it.
        let mut over = *kp.encapsulation_key();
        over[0] = 0xff;
        over[1] |= 0x0f;
        assert_eq!(
            CheckedEncapsulationKey::new(&over).err(),
            Some(KemError::Modulus)
        );
    }
}
