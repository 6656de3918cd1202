//! The built-in guest.
#![cfg_attr(not(test), no_std)]
