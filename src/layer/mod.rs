//! One module per tower layer, named for its concern. The stack that orders them is built in
//! [`crate::stack`].

pub mod access;
pub mod cache;
pub mod coalesce;
pub mod credential;
pub mod limit;
pub mod observe;
pub mod rescue;
pub mod retry;
pub mod tracking;
