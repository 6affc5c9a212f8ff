//! The shapes an operator may write, each read into a [`super::builder::Builder`]: the native
//! shape, the ASM plugin's (`asm`), and Higress `ai-token-ratelimit`'s (`higress`).

pub(super) mod asm;
pub(super) mod higress;
pub(super) mod native;
