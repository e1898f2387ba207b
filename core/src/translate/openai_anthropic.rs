//! Placeholder: the openai_anthropic pair translator is being written (see translate/mod.rs for the Pair trait).
