//! The API's HTTP server: tiny_http on its own thread, answering from the current snapshot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{dispatch, SharedSnapshot};

/// The API server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiServerError {
    /// Binding the listening socket failed.
    #[error("cannot listen on {addr}: {message}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        message: String,
    },
    /// The thread could not be spawned.
    #[error("cannot start the API thread: {0}")]
    Spawn(std::io::Error),
}

/// A running API server; dropping it stops the thread.
pub struct ApiServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl ApiServer {
    /// Listens on `addr` and serves `snapshot` from a new thread.
    pub fn start(addr: SocketAddr, snapshot: SharedSnapshot) -> Result<ApiServer, ApiServerError> {
        let server = tiny_http::Server::http(addr).map_err(|e| ApiServerError::Bind {
            addr,
            message: e.to_string(),
        })?;
        let addr = server.server_addr().to_ip().unwrap_or(addr);
        let server = Arc::new(server);
        let s = Arc::clone(&server);
        let thread = std::thread::Builder::new()
            .name("hypha-api".into())
            .spawn(move || serve(&s, &snapshot))
            .map_err(ApiServerError::Spawn)?;
        Ok(ApiServer {
            server,
            thread: Some(thread),
            addr,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

fn serve(server: &tiny_http::Server, snapshot: &SharedSnapshot) {
    for request in server.incoming_requests() {
        let reply = {
            let snap = snapshot.load();
            dispatch(request.method().as_str(), request.url(), &snap)
        };
        let mut response =
            tiny_http::Response::from_string(reply.body).with_status_code(reply.status);
        if let Ok(h) = tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
        {
            response.add_header(h);
        }
        if let Err(e) = request.respond(response) {
            tracing::debug!(error = %e, "API client went away");
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!("API thread panicked");
            }
        }
    }
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("addr", &self.addr)
            .finish()
    }
}
