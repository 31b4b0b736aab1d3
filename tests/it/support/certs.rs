//! Certificates made for a test (rcgen, ECDSA P-256): a CA, server certificates for
//! 127.0.0.1/localhost, client certificates with a CN, DNS and e-mail names, expired ones, and
//! a second CA nobody trusts. Written as PEM files into a temporary directory.

use std::path::{Path, PathBuf};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};

/// A CA that signs the test's certificates.
pub struct Ca {
    /// The CA's certificate and key.
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// Where the files go.
    dir: PathBuf,
    /// The CA certificate's file.
    pub pem: PathBuf,
}

/// A certificate and its key, as files.
pub struct Pair {
    /// The certificate chain (leaf only).
    pub cert: PathBuf,
    /// The private key (PKCS#8).
    pub key: PathBuf,
}

/// What a client certificate names.
#[derive(Default)]
pub struct ClientNames<'a> {
    /// The subject's common name.
    pub cn: &'a str,
    /// DNS subject alternative names.
    pub dns: &'a [&'a str],
    /// E-mail subject alternative names.
    pub email: &'a [&'a str],
    /// Valid only in 2020 (expired).
    pub expired: bool,
}

impl Ca {
    /// A new CA named `name`, its certificate written to `dir/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pem = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&pem, issuer.pem()).unwrap();
        Ca { issuer, dir: dir.to_owned(), pem }
    }

    fn write(&self, file: &str, params: CertificateParams) -> Pair {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let pair = Pair {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        std::fs::write(&pair.cert, cert.pem()).unwrap();
        std::fs::write(&pair.key, key.serialize_pem()).unwrap();
        pair
    }

    /// A server certificate for 127.0.0.1 and localhost, files `<file>.pem`/`<file>.key`.
    pub fn server(&self, file: &str) -> Pair {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, format!("{file} server"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.write(file, params)
    }

    /// A client certificate with `names`.
    pub fn client(&self, file: &str, names: ClientNames<'_>) -> Pair {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names.cn);
        for d in names.dns {
            params.subject_alt_names.push(SanType::DnsName((*d).try_into().unwrap()));
        }
        for e in names.email {
            params.subject_alt_names.push(SanType::Rfc822Name((*e).try_into().unwrap()));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if names.expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2020, 12, 31);
        }
        self.write(file, params)
    }
}
