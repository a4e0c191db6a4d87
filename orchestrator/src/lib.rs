//! Starts, wires and supervises the device processes and the VMM from one config file.

pub mod image;
