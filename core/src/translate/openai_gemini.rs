//! Placeholder: the openai_gemini pair translator is being written (see translate/mod.rs for the Pair trait).
