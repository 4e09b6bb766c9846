//! kombu's Redis transport, as Celery producers and workers use it, and Celery's Redis
//! result backend.

pub mod backend;
pub mod transport;

pub use backend::RedisResults;
pub use transport::RedisTransport;
