//! Normalised token usage, whatever the provider reported.
//!
//! Unknown is not zero: every field is `None` until the provider said a number. Providers name
//! and split these differently; each translator maps its provider's fields here:
//! - `input`: all prompt tokens, including cached ones (OpenAI `prompt_tokens`; Anthropic
//!   `input_tokens + cache_read_input_tokens + cache_creation_input_tokens`; Gemini
//!   `promptTokenCount`).
//! - `output`: all generated tokens, including reasoning (OpenAI `completion_tokens`; Anthropic
//!   `output_tokens`; Gemini `candidatesTokenCount + thoughtsTokenCount`).
//! - `cached_read`: prompt tokens served from the provider's cache (part of `input`).
//! - `cache_write`: prompt tokens written to the cache (part of `input`; Anthropic only).
//! - `reasoning`: thinking tokens (part of `output`).

use serde::{Deserialize, Serialize};

/// Token usage of one request, as the provider reported it (`None`: not reported).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens the provider reported, cached ones included.
    pub input: Option<u64>,
    /// Generated tokens the provider reported, reasoning included.
    pub output: Option<u64>,
    /// Prompt tokens served from the provider's cache (part of `input`).
    pub cached_read: Option<u64>,
    /// Prompt tokens written to the provider's cache (part of `input`; Anthropic only).
    pub cache_write: Option<u64>,
    /// Thinking tokens (part of `output`).
    pub reasoning: Option<u64>,
}

impl Usage {
    /// `input + output` when both are known.
    pub fn total(&self) -> Option<u64> {
        Some(self.input?.saturating_add(self.output?))
    }

    /// Fields `later` knows replace this one's (streams report usage in several events, the
    /// later ones cumulative).
    pub(crate) fn merge(&mut self, later: Usage) {
        let keep = |a: &mut Option<u64>, b: Option<u64>| {
            if b.is_some() {
                *a = b;
            }
        };
        keep(&mut self.input, later.input);
        keep(&mut self.output, later.output);
        keep(&mut self.cached_read, later.cached_read);
        keep(&mut self.cache_write, later.cache_write);
        keep(&mut self.reasoning, later.reasoning);
    }

    /// Whether the provider reported nothing at all.
    pub(crate) fn is_empty(&self) -> bool {
        *self == Usage::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_is_not_zero() {
        let u = Usage { input: Some(10), ..Usage::default() };
        assert_eq!(u.total(), None);
        assert!(!u.is_empty());
        assert!(Usage::default().is_empty());
    }

    #[test]
    fn later_reports_replace_earlier_ones_field_by_field() {
        let mut u = Usage { input: Some(10), output: Some(1), ..Usage::default() };
        u.merge(Usage { output: Some(42), reasoning: Some(7), ..Usage::default() });
        assert_eq!(u, Usage { input: Some(10), output: Some(42), reasoning: Some(7), ..Usage::default() });
        assert_eq!(u.total(), Some(52));
    }
}
