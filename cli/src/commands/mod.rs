//! One module per command group, each with the functions `main.rs`
//! dispatches to. (The older commands still live in `main.rs`; new ones go
//! here.)

pub mod header;
