//! Write pgstream-host handlers in Rust.
//!
//! A handler is a WebAssembly component that receives batches of row changes from Postgres and
//! turns them into vector-store writes through the host: [`host::embed`] texts,
//! [`host::upsert`] points, [`host::merge`] payload keys into stored points, [`host::delete`]
//! points. It is built against `pgstream:handler@0.2.0` (`wit/handler.wit`). Implement [`Handler`] and export it:
//!
//! ```ignore
//! use pgstream_guest::{ChangeEvent, Error, Handler, Operation, host};
//!
//! struct MyHandler;
//!
//! impl Handler for MyHandler {
//!     fn handle(events: Vec<ChangeEvent>) -> Result<(), Error> {
//!         for event in &events {
//!             let id = event.row().get::<i64>("id")?;
//!             host::log(pgstream_guest::LogLevel::Info, &format!("{:?} {id:?}", event.operation));
//!         }
//!         Ok(())
//!     }
//! }
//!
//! pgstream_guest::export_handler!(MyHandler);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` (crate type `cdylib`).
//!
//! Reading rows: [`ChangeEvent::row`] gives a [`Row`] with typed getters that keep SQL NULL
//! apart from a TOASTed value the update did not send ([`Field`]); [`ChangeEvent::row_json`]
//! and [`ChangeEvent::point_key`] build the usual point payload and key, and
//! [`ChangeEvent::is_partial`] says when that payload lacks a column the update left unchanged.
//! [`WritePlan`] collapses a batch into one `embed` call and one `upsert` (and `merge`) call with
//! the right final state per row.
//!
//! Rows a backfill reads arrive as [`Operation::Read`]: treat them as upserts.
//!
//! A handler must be idempotent: after a failure or a crash the host delivers the batch again.
#![warn(missing_docs)]

mod json;
mod plan;
mod row;
mod timestamp;

/// The bindings generated from `wit/handler.wit`. Not part of the API: use the re-exports.
#[doc(hidden)]
pub mod __bindings {
    // The generated glue between the canonical ABI and Rust needs `unsafe`.
    #![allow(unsafe_code, missing_docs)]
    wit_bindgen::generate!({
        path: "../wit",
        world: "handler",
        pub_export_macro: true,
        default_bindings_module: "pgstream_guest::__bindings",
        additional_derives: [PartialEq],
    });
}

pub use __bindings::pgstream::handler::types::{
    ChangeEvent, Column, Error, LogLevel, Operation, Point, PointKey, Value,
};
pub use plan::WritePlan;
pub use row::{Field, FieldError, FromPgText, Row, type_oid};
pub use timestamp::Timestamp;

/// What the host offers a handler; every call is batched (pass all items at once).
pub mod host {
    pub use crate::__bindings::pgstream::handler::host::{
        delete, delete_table, embed, log, merge, upsert,
    };
}

/// A change handler. Implement it on a unit struct and export it with [`export_handler!`].
pub trait Handler {
    /// Handles one batch of changes, in commit order. Returning `Err` (or panicking) makes the
    /// host retry the whole batch on a fresh instance, so the work must be idempotent.
    fn handle(events: Vec<ChangeEvent>) -> Result<(), Error>;
}

impl Error {
    /// An error with a message for the operator reading the host's log.
    pub fn new(message: impl Into<String>) -> Error {
        Error {
            message: message.into(),
        }
    }
}

impl From<String> for Error {
    fn from(message: String) -> Error {
        Error { message }
    }
}

impl From<&str> for Error {
    fn from(message: &str) -> Error {
        Error::new(message)
    }
}

impl From<FieldError> for Error {
    fn from(error: FieldError) -> Error {
        Error::new(error.to_string())
    }
}

/// Exports a [`Handler`] implementation as the component's `handle` function. Use it once, at
/// the crate root of a `cdylib` crate, naming a type declared there.
#[macro_export]
macro_rules! export_handler {
    ($handler:ident) => {
        impl $crate::__bindings::Guest for $handler {
            fn handle(
                events: ::std::vec::Vec<$crate::ChangeEvent>,
            ) -> ::core::result::Result<(), $crate::Error> {
                <$handler as $crate::Handler>::handle(events)
            }
        }
        $crate::__bindings::export!($handler with_types_in $crate::__bindings);
    };
}
