//! Placeholder: the openai_openai pair translator is being written (see translate/mod.rs for the Pair trait).
