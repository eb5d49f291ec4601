//! Throwaway certificates: an RSA key and a self-signed certificate made at run time, for
//! `demo --credential certificate` and the tests. Nothing is shipped or committed; the key is
//! printed nowhere (`Debug` redacts it).

use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use secrecy::{ExposeSecret, SecretString};

/// The RSA key size: Entra ID takes 2048 bits and more.
pub const THROWAWAY_KEY_BITS: usize = 2048;

/// A certificate and its private key, both PEM.
pub struct ThrowawayCertificate {
    /// The certificate (public), `-----BEGIN CERTIFICATE-----`.
    pub certificate_pem: String,
    /// Its PKCS#8 private key, `-----BEGIN PRIVATE KEY-----`.
    pub private_key_pem: SecretString,
}

impl std::fmt::Debug for ThrowawayCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrowawayCertificate")
            .field("private_key_pem", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// A fresh 2048-bit RSA key and a self-signed certificate for `common_name`, valid from now
/// for a year (rcgen's defaults: the sandbox checks the signature, not the validity window).
pub fn throwaway_certificate(common_name: &str) -> Result<ThrowawayCertificate, String> {
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, THROWAWAY_KEY_BITS)
        .map_err(|e| format!("RSA key generation failed: {e}"))?;
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| format!("RSA key encoding failed: {e}"))?;
    let private_key_pem = SecretString::from(pem.as_str().to_owned());
    let pair = rcgen::KeyPair::from_pem(private_key_pem.expose_secret())
        .map_err(|e| format!("the generated key was not accepted: {e}"))?;
    let mut params = rcgen::CertificateParams::new(vec![common_name.to_owned()])
        .map_err(|e| format!("certificate parameters: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    let certificate = params
        .self_signed(&pair)
        .map_err(|e| format!("self-signing failed: {e}"))?;
    Ok(ThrowawayCertificate {
        certificate_pem: certificate.pem(),
        private_key_pem,
    })
}
