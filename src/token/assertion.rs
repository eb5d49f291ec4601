//! Client assertions (RFC 7523 §2.2, Entra ID's "certificate credentials" and "workload identity
//! federation"): instead of a client secret, the token request carries
//! `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer` and a
//! `client_assertion`, which is either
//! - a JWT pcgate signs with the certificate's private key, naming the certificate by both its
//!   thumbprints (`x5t#S256` and `x5t`): PS256 on the v2 endpoint, RS256 on v1 (see [`header`]),
//!   with `aud` = the token URL, `iss` = `sub` = the client id, a 10-minute `exp`, `nbf`, `iat` and
//!   a fresh `jti` (a uuid v4); or
//! - the content of `federated_token_file`: a service account token the kubelet projects and
//!   rotates, which Entra ID trusts through the app's federated credential.
//!
//! The certificate and key are re-read when either file changes (a rotated Kubernetes Secret or
//! cert-manager renewal), checked to belong together first; the federated token is read for every
//! token request. The log says that a file changed, and the certificate's thumbprint (public),
//! never a key or an assertion.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::SecretString;
use serde::Serialize;

use super::endpoint::FileStamp;

/// `client_assertion_type` for a JWT bearer assertion (RFC 7523 §2.2).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How long a signed assertion is valid: used at once, so short (Entra ID allows up to a day).
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(600);

/// Why a credential file cannot be used. Names the key and the file, never what it holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key} {} {problem}", path.display())]
pub struct CredentialFileError {
    /// The config key naming the file.
    pub key: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong and what to do.
    pub problem: String,
}

impl CredentialFileError {
    fn new(key: &'static str, path: &Path, problem: impl Into<String>) -> CredentialFileError {
        CredentialFileError {
            key,
            path: path.to_owned(),
            problem: problem.into(),
        }
    }

    fn unreadable(key: &'static str, path: &Path, error: &std::io::Error) -> CredentialFileError {
        CredentialFileError::new(key, path, format!("is not readable ({error})"))
    }
}

/// `path`, at most [`MAX_CREDENTIAL_FILE_BYTES`](super::endpoint::MAX_CREDENTIAL_FILE_BYTES).
fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, CredentialFileError> {
    super::endpoint::read_file_capped(path)
        .map_err(|e| CredentialFileError::unreadable(key, path, &e))
}

/// Whether a file's mode lets every user of the host read, write or run it (`o+rwx`). A group
/// bit is fine: Kubernetes mounts Secrets 0440 with the pod's `fsGroup`.
pub fn world_accessible(mode: u32) -> bool {
    mode & 0o007 != 0
}

/// Warns (once, as the credential is opened) when `private_key_file` is world-accessible.
fn warn_if_world_accessible(private_key_file: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = std::fs::metadata(private_key_file) {
            let mode = meta.permissions().mode();
            if world_accessible(mode) {
                tracing::warn!(
                    file = %private_key_file.display(),
                    mode = %format!("{:04o}", mode & 0o7777),
                    "private_key_file is accessible to every user on this host: chmod 600 (or \
                     440 with a group); on Kubernetes set the Secret volume's defaultMode to 0440"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = private_key_file;
}

/// A certificate and its key, loaded and checked to belong together.
struct Loaded {
    /// base64url SHA-1 of the certificate's DER (`x5t`).
    x5t: String,
    /// base64url SHA-256 of the certificate's DER (`x5t#S256`).
    x5t_s256: String,
    /// SHA-1 thumbprint in hex, as the Entra ID portal shows it (for logs).
    thumbprint_hex: String,
    key: EncodingKey,
}

/// The SHA-1 and SHA-256 thumbprints of a DER certificate: (`x5t`, `x5t#S256`, SHA-1 hex).
pub fn thumbprints(der: &[u8]) -> (String, String, String) {
    let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der);
    let sha256 = ring::digest::digest(&ring::digest::SHA256, der);
    let hex = sha1
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<String>();
    (
        URL_SAFE_NO_PAD.encode(sha1),
        URL_SAFE_NO_PAD.encode(sha256),
        hex,
    )
}

fn load(certificate_file: &Path, private_key_file: &Path) -> Result<Loaded, CredentialFileError> {
    const CERT: &str = "certificate_file";
    const KEY: &str = "private_key_file";
    let cert_pem = read(CERT, certificate_file)?;
    // The PEM parser's errors can quote a line of the file: none of them is shown.
    let cert = CertificateDer::from_pem_slice(&cert_pem).map_err(|_| {
        CredentialFileError::new(
            CERT,
            certificate_file,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        )
    })?;
    let key_pem = read(KEY, private_key_file)?;
    let not_rsa = || {
        CredentialFileError::new(
            KEY,
            private_key_file,
            "holds no PEM RSA private key (-----BEGIN PRIVATE KEY----- or -----BEGIN RSA PRIVATE \
             KEY-----, unencrypted); Entra ID certificate credentials are RSA",
        )
    };
    // The first private key block of the file (a combined file may hold the certificate first)
    // is both the key checked against the certificate and the key that signs: jsonwebtoken's
    // RSA key is the PKCS#1 RSAPrivateKey DER, which a PKCS#8 file wraps in an OCTET STRING.
    let (pair, key) = match PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| not_rsa())? {
        PrivateKeyDer::Pkcs8(der) => {
            let der = der.secret_pkcs8_der();
            let pair = ring::signature::RsaKeyPair::from_pkcs8(der).map_err(|_| not_rsa())?;
            let info = rsa::pkcs8::PrivateKeyInfo::try_from(der).map_err(|_| not_rsa())?;
            (pair, EncodingKey::from_rsa_der(info.private_key))
        }
        PrivateKeyDer::Pkcs1(der) => {
            let der = der.secret_pkcs1_der();
            let pair = ring::signature::RsaKeyPair::from_der(der).map_err(|_| not_rsa())?;
            (pair, EncodingKey::from_rsa_der(der))
        }
        _ => return Err(not_rsa()),
    };
    // The certificate's SubjectPublicKeyInfo holds the RSAPublicKey DER as it is: a key that
    // belongs to the certificate has its public half there, byte for byte.
    let public = ring::signature::KeyPair::public_key(&pair).as_ref();
    if !cert.as_ref().windows(public.len()).any(|w| w == public) {
        return Err(CredentialFileError::new(
            KEY,
            private_key_file,
            format!(
                "is not the key of certificate_file {}: put the certificate and its own key there",
                certificate_file.display()
            ),
        ));
    }
    let (x5t, x5t_s256, thumbprint_hex) = thumbprints(cert.as_ref());
    Ok(Loaded {
        x5t,
        x5t_s256,
        thumbprint_hex,
        key,
    })
}

/// A certificate credential: the two files and what was read from them last.
pub struct CertificateCredential {
    certificate_file: PathBuf,
    private_key_file: PathBuf,
    read: Mutex<(Option<FileStamp>, Option<FileStamp>, Loaded)>,
}

#[derive(Serialize)]
struct Claims<'a> {
    aud: &'a str,
    iss: &'a str,
    sub: &'a str,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
}

impl CertificateCredential {
    /// Reads and checks both files now.
    pub fn open(
        certificate_file: &Path,
        private_key_file: &Path,
    ) -> Result<CertificateCredential, CredentialFileError> {
        let stamps = (
            FileStamp::of(certificate_file),
            FileStamp::of(private_key_file),
        );
        let loaded = load(certificate_file, private_key_file)?;
        warn_if_world_accessible(private_key_file);
        tracing::info!(
            file = %certificate_file.display(),
            thumbprint = %loaded.thumbprint_hex,
            "certificate credential loaded"
        );
        Ok(CertificateCredential {
            certificate_file: certificate_file.to_owned(),
            private_key_file: private_key_file.to_owned(),
            read: Mutex::new((stamps.0, stamps.1, loaded)),
        })
    }

    /// A fresh signed assertion for `client_id` at `token_url`; the files re-read first if either
    /// changed. A pair that cannot be used now (one file rotated before the other, say) leaves the
    /// last pair in use; the log says so.
    pub fn assertion(&self, client_id: &str, token_url: &str) -> Result<SecretString, String> {
        let mut read = self.read.lock().unwrap_or_else(|e| e.into_inner());
        let stamps = (
            FileStamp::of(&self.certificate_file),
            FileStamp::of(&self.private_key_file),
        );
        if stamps.0 != read.0 || stamps.1 != read.1 {
            match load(&self.certificate_file, &self.private_key_file) {
                Ok(loaded) => {
                    tracing::info!(
                        file = %self.certificate_file.display(),
                        thumbprint = %loaded.thumbprint_hex,
                        "certificate_file or private_key_file changed: re-read"
                    );
                    *read = (stamps.0, stamps.1, loaded);
                }
                Err(error) => tracing::warn!(
                    %error,
                    "certificate_file or private_key_file changed but cannot be used: the last \
                     certificate read stays in use"
                ),
            }
        }
        let loaded = &read.2;
        sign(loaded, client_id, token_url)
    }
}

/// Whether `token_url` is a v2 endpoint (`.../oauth2/v2.0/token`).
fn is_v2(token_url: &str) -> bool {
    token_url.contains("/v2.0/")
}

/// The assertion's header for the endpoint at `token_url`.
///
/// The algorithm goes with the thumbprint, as Microsoft pairs them: the current "certificate
/// credentials" page (learn.microsoft.com/entra/identity-platform/certificate-credentials) gives
/// `alg` PS256 with `x5t#S256` (SHA-256), its earlier revision and the v1 endpoint's ADAL era
/// RS256 with `x5t` (SHA-1), and MSAL signs PS256 when it sends `x5t#S256`, RS256 when it sends
/// `x5t`. Entra ID is reported to refuse `x5t#S256` alone with RS256 (AADSTS700027). So the v2
/// endpoint gets PS256 (RSA-PSS: jsonwebtoken signs it with ring) and v1 RS256, and both get both
/// thumbprints: a thumbprint is a hash of the public certificate, harmless to send, and each
/// endpoint finds the certificate by the one it looks up.
pub fn header(token_url: &str, x5t: &str, x5t_s256: &str) -> Header {
    let alg = if is_v2(token_url) {
        Algorithm::PS256
    } else {
        Algorithm::RS256
    };
    let mut header = Header::new(alg);
    header.typ = Some("JWT".to_owned());
    header.x5t = Some(x5t.to_owned());
    header.x5t_s256 = Some(x5t_s256.to_owned());
    header
}

fn sign(loaded: &Loaded, client_id: &str, token_url: &str) -> Result<SecretString, String> {
    let header = header(token_url, &loaded.x5t, &loaded.x5t_s256);
    let now = super::endpoint::unix_now();
    let claims = Claims {
        aud: token_url,
        iss: client_id,
        sub: client_id,
        exp: now + ASSERTION_LIFETIME.as_secs(),
        nbf: now,
        iat: now,
        jti: uuid::Uuid::new_v4().to_string(),
    };
    jsonwebtoken::encode(&header, &claims, &loaded.key)
        .map(SecretString::from)
        .map_err(|e| format!("could not sign the client assertion: {e}"))
}

/// A workload identity token file: read for every token request (the kubelet rotates it well
/// before it expires, and a read is cheap next to a token request).
pub struct FederatedToken {
    path: PathBuf,
    stamp: Mutex<Option<FileStamp>>,
}

impl FederatedToken {
    /// Checks that `path` holds a token now.
    pub fn open(path: &Path) -> Result<FederatedToken, CredentialFileError> {
        read_token(path)?;
        Ok(FederatedToken {
            path: path.to_owned(),
            stamp: Mutex::new(FileStamp::of(path)),
        })
    }

    /// The token as the file holds it now.
    pub fn current(&self) -> Result<SecretString, CredentialFileError> {
        let token = read_token(&self.path)?;
        let stamp = FileStamp::of(&self.path);
        let mut last = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        if *last != stamp {
            tracing::info!(file = %self.path.display(), "federated_token_file changed: re-read");
            *last = stamp;
        }
        Ok(token)
    }
}

fn read_token(path: &Path) -> Result<SecretString, CredentialFileError> {
    const KEY: &str = "federated_token_file";
    let text = super::endpoint::read_capped_text(path).map_err(|e| {
        let mut error = CredentialFileError::unreadable(KEY, path, &e);
        if e.kind() == std::io::ErrorKind::NotFound {
            error.problem.push_str(
                ": on AKS, label the pod azure.workload.identity/use: \"true\" and give it a \
                 service account annotated azure.workload.identity/client-id",
            );
        }
        error
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(CredentialFileError::new(KEY, path, "is empty"));
    }
    Ok(SecretString::from(token.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};
    use secrecy::ExposeSecret;

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("pcgate-assertion-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
        let pair = crate::sandbox::throwaway_certificate("pcgate-test").unwrap();
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, &pair.certificate_pem).unwrap();
        std::fs::write(&key, pair.private_key_pem.expose_secret()).unwrap();
        (cert, key, pair.certificate_pem)
    }

    #[derive(serde::Deserialize)]
    struct Seen {
        aud: String,
        iss: String,
        sub: String,
        exp: u64,
        nbf: u64,
        iat: u64,
        jti: String,
    }

    #[test]
    fn assertions_are_signed_named_by_thumbprint_and_unique() {
        let dir = dir("sign");
        let (cert, key, cert_pem) = write_pair(&dir, "a");
        let credential = CertificateCredential::open(&cert, &key).unwrap();
        let v1 = "https://login.example/t/oauth2/token";
        let first = credential.assertion("app-id", v1).unwrap();
        let second = credential.assertion("app-id", v1).unwrap();

        let header = jsonwebtoken::decode_header(first.expose_secret()).unwrap();
        assert_eq!(header.alg, Algorithm::RS256, "v1: RS256");
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
        let (x5t, x5t_s256, _) = thumbprints(der.as_ref());
        assert_eq!(header.x5t_s256.as_deref(), Some(x5t_s256.as_str()));
        assert_eq!(header.x5t.as_deref(), Some(x5t.as_str()), "v1 needs x5t");
        assert_eq!(x5t_s256.len(), 43, "base64url of 32 bytes, unpadded");
        assert_eq!(x5t.len(), 27, "base64url of 20 bytes, unpadded");

        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[v1]);
        validation.set_issuer(&["app-id"]);
        let public = DecodingKey::from_rsa_pem(cert_pem.as_bytes()).unwrap();
        let claims = |jwt: &SecretString| {
            jsonwebtoken::decode::<Seen>(jwt.expose_secret(), &public, &validation)
                .unwrap()
                .claims
        };
        let (a, b) = (claims(&first), claims(&second));
        assert_eq!(
            (a.aud.as_str(), a.iss.as_str(), a.sub.as_str()),
            (v1, "app-id", "app-id")
        );
        assert_eq!(a.exp, a.iat + ASSERTION_LIFETIME.as_secs());
        assert!(a.nbf <= a.iat && a.iat.abs_diff(super::super::endpoint::unix_now()) < 60);
        assert_ne!(a.jti, b.jti, "each assertion has its own jti");
        assert!(uuid::Uuid::parse_str(&a.jti).is_ok());

        // v2 endpoints get PS256, which Microsoft pairs with x5t#S256, and x5t as well; the
        // signature verifies as RSA-PSS with the certificate's key.
        let v2_url = "https://login.example/t/oauth2/v2.0/token";
        let v2 = credential.assertion("app-id", v2_url).unwrap();
        let header = jsonwebtoken::decode_header(v2.expose_secret()).unwrap();
        assert_eq!(header.alg, Algorithm::PS256, "v2: PS256");
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert_eq!(header.x5t_s256.as_deref(), Some(x5t_s256.as_str()));
        assert_eq!(header.x5t.as_deref(), Some(x5t.as_str()));
        let mut pss = Validation::new(Algorithm::PS256);
        pss.set_audience(&[v2_url]);
        pss.set_issuer(&["app-id"]);
        let seen = jsonwebtoken::decode::<Seen>(v2.expose_secret(), &public, &pss).unwrap();
        assert_eq!(seen.claims.aud, v2_url);
        assert!(
            jsonwebtoken::decode::<Seen>(v2.expose_secret(), &public, &validation).is_err(),
            "a PS256 signature is not taken as RS256"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused_and_a_rotated_pair_is_read_again() {
        let dir = dir("rotate");
        let (cert_a, key_a, _) = write_pair(&dir, "a");
        let (cert_b, key_b, cert_b_pem) = write_pair(&dir, "b");
        let error = CertificateCredential::open(&cert_a, &key_b)
            .err()
            .expect("a key of another certificate");
        assert_eq!(error.key, "private_key_file");
        assert!(error.to_string().contains("is not the key of"), "{error}");
        let error = CertificateCredential::open(&key_a, &key_a).err().unwrap();
        assert_eq!(error.key, "certificate_file");
        let error = CertificateCredential::open(&cert_a, &cert_a).err().unwrap();
        assert!(error.to_string().contains("RSA private key"), "{error}");
        let key_text = std::fs::read_to_string(&key_a).unwrap();
        let body: String = key_text.lines().nth(1).unwrap().to_owned();
        assert!(!error.to_string().contains(&body));

        // Rotation: the files are replaced in place; the next assertion names the new one.
        let credential = CertificateCredential::open(&cert_a, &key_a).unwrap();
        let url = "https://login.example/t/oauth2/v2.0/token";
        std::fs::copy(&cert_b, &cert_a).unwrap();
        // Half-way (new certificate, old key): the old pair stays in use.
        let mid = credential.assertion("id", url).unwrap();
        let before = jsonwebtoken::decode_header(mid.expose_secret()).unwrap();
        std::fs::copy(&key_b, &key_a).unwrap();
        let after = credential.assertion("id", url).unwrap();
        let header = jsonwebtoken::decode_header(after.expose_secret()).unwrap();
        let der = CertificateDer::from_pem_slice(cert_b_pem.as_bytes()).unwrap();
        assert_eq!(header.x5t_s256, Some(thumbprints(der.as_ref()).1));
        assert_ne!(before.x5t_s256, header.x5t_s256);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// One PEM file holding the certificate and then its key (as `cat cert.pem key.pem` or a
    /// cert-manager `tls.pem` makes it) serves as both files, PKCS#8 and PKCS#1 alike: the key
    /// checked against the certificate is the key that signs.
    #[test]
    fn a_combined_certificate_and_key_file_is_used_for_both() {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::DecodePrivateKey;
        let dir = dir("combined");
        let pair = crate::sandbox::throwaway_certificate("pcgate-test").unwrap();
        let pkcs8 = pair.private_key_pem.expose_secret().to_owned();
        let pkcs1 = rsa::RsaPrivateKey::from_pkcs8_pem(&pkcs8)
            .unwrap()
            .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
            .unwrap()
            .to_string();
        assert!(pkcs1.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        let public = DecodingKey::from_rsa_pem(pair.certificate_pem.as_bytes()).unwrap();
        let url = "https://login.example/t/oauth2/token";
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[url]);
        for (name, key) in [("pkcs8", &pkcs8), ("pkcs1", &pkcs1)] {
            let file = dir.join(format!("{name}.pem"));
            std::fs::write(&file, format!("{}{key}", pair.certificate_pem)).unwrap();
            let credential =
                CertificateCredential::open(&file, &file).unwrap_or_else(|e| panic!("{name}: {e}"));
            let jwt = credential.assertion("id", url).unwrap();
            jsonwebtoken::decode::<Seen>(jwt.expose_secret(), &public, &validation)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn only_a_key_file_every_user_can_reach_is_world_accessible() {
        for mode in [
            0o600, 0o400, 0o440, 0o640, 0o660, 0o100600, 0o100440, 0o120640,
        ] {
            assert!(!world_accessible(mode), "{mode:o}");
        }
        for mode in [0o644, 0o604, 0o602, 0o601, 0o666, 0o777, 0o100644, 0o100444] {
            assert!(world_accessible(mode), "{mode:o}");
        }
    }

    /// A credential file past 64 KiB is the wrong file (or a device): refused, naming the key
    /// and the cap, for each kind of file; one at the cap is read.
    #[test]
    fn credential_files_past_the_cap_are_refused() {
        use super::super::endpoint::{SecretFile, MAX_CREDENTIAL_FILE_BYTES};
        let dir = dir("cap");
        let (cert, key, cert_pem) = write_pair(&dir, "a");
        let big = dir.join("big");
        let max = MAX_CREDENTIAL_FILE_BYTES as usize;
        std::fs::write(&big, "x".repeat(max + 1)).unwrap();
        let error = FederatedToken::open(&big).err().expect("too large");
        assert!(
            error.key == "federated_token_file" && error.to_string().contains("64 KiB"),
            "{error}"
        );
        let error = SecretFile::open(&big).err().expect("too large");
        assert!(error.to_string().contains("64 KiB"), "{error}");
        let error = CertificateCredential::open(&big, &key).err().unwrap();
        assert!(
            error.key == "certificate_file" && error.to_string().contains("64 KiB"),
            "{error}"
        );
        // A valid key followed by padding past the cap.
        let padded = dir.join("padded.key");
        let key_pem = std::fs::read_to_string(&key).unwrap();
        std::fs::write(&padded, format!("{key_pem}{}", "\n".repeat(max))).unwrap();
        let error = CertificateCredential::open(&cert, &padded).err().unwrap();
        assert!(
            error.key == "private_key_file" && error.to_string().contains("64 KiB"),
            "{error}"
        );
        // At the cap exactly: read.
        std::fs::write(
            &padded,
            format!("{key_pem}{}", "\n".repeat(max - key_pem.len())),
        )
        .unwrap();
        CertificateCredential::open(&cert, &padded).unwrap();
        std::fs::write(&big, "x".repeat(max)).unwrap();
        assert_eq!(
            FederatedToken::open(&big)
                .unwrap()
                .current()
                .unwrap()
                .expose_secret()
                .len(),
            max
        );
        assert!(!cert_pem.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_federated_token_is_read_for_every_request() {
        let dir = dir("federated");
        let file = dir.join("token");
        assert!(FederatedToken::open(&file)
            .err()
            .unwrap()
            .to_string()
            .contains("azure.workload.identity/use"));
        std::fs::write(&file, "  \n").unwrap();
        assert!(FederatedToken::open(&file).is_err(), "empty");
        std::fs::write(&file, "eyJ.first.token\n").unwrap();
        let token = FederatedToken::open(&file).unwrap();
        assert_eq!(token.current().unwrap().expose_secret(), "eyJ.first.token");
        std::fs::write(&file, "eyJ.second.token").unwrap();
        assert_eq!(token.current().unwrap().expose_secret(), "eyJ.second.token");
        // Read for every request, not only when the file looks changed: a token of the same
        // length written in place with the mtime put back (same inode, size and mtime) is the
        // one sent next.
        super::super::endpoint::tests::rewrite_keeping_mtime(&file, "eyJ.thirds.token");
        assert_eq!(token.current().unwrap().expose_secret(), "eyJ.thirds.token");
        std::fs::remove_file(&file).unwrap();
        let error = token.current().unwrap_err().to_string();
        assert!(
            error.contains("federated_token_file") && !error.contains("eyJ"),
            "{error}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
