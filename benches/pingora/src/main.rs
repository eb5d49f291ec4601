//! `pingora-bench-proxy UPSTREAM_ADDR LISTEN_ADDR TOKEN [THREADS]`: forwards every request to
//! UPSTREAM_ADDR over pooled HTTP/1.1 with `Authorization: Bearer TOKEN`, as the other peers in
//! benches/run.sh do. No logging, no cache.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Forward {
    upstream: String,
    authorization: String,
}

#[async_trait]
impl ProxyHttp for Forward {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        upstream_request.insert_header("authorization", self.authorization.as_str())?;
        Ok(())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, upstream, listen, token, rest @ ..] = args.as_slice() else {
        eprintln!("usage: pingora-bench-proxy UPSTREAM_ADDR LISTEN_ADDR TOKEN [THREADS]");
        std::process::exit(64);
    };
    let threads = rest.first().and_then(|t| t.parse().ok()).unwrap_or(2);
    let conf = ServerConf {
        threads,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        Forward {
            upstream: upstream.clone(),
            authorization: format!("Bearer {token}"),
        },
    );
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever();
}
