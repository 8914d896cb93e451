//! Tokens and money for one call, decided in exactly one place.
//!
//! Money is integer nano-USD. When the provider reports no usage (a stream cut,
//! timed out or abandoned by the client), tokens are estimated from what was sent and
//! received and the call is marked estimated: tokens that were generated are never
//! billed as zero.

use crate::config::Price;
use crate::providers::{Completion, Usage};

/// What a call is billed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Bill {
    pub usage: Usage,
    pub estimated: bool,
    pub cost_nanousd: u64,
}

/// Bytes per token assumed by estimates; 4 is the usual figure for English text and
/// JSON, and an underestimate of bytes per token over-counts tokens, which is the safe
/// side for a budget.
const BYTES_PER_TOKEN: usize = 4;

pub fn estimate_tokens(bytes: usize) -> u32 {
    bytes.div_ceil(BYTES_PER_TOKEN).min(u32::MAX as usize) as u32
}

/// Cost of `usage` at `price`, rounded up to the next nano-USD.
pub fn cost_nanousd(usage: &Usage, price: &Price) -> u64 {
    let cached = usage.cached_input.min(usage.input) as u128;
    let uncached = usage.input as u128 - cached;
    priced(uncached, cached, usage.output as u128, price)
}

/// Tokens at `price`, in 128 bits, rounded up to the next nano-USD.
fn priced(uncached: u128, cached: u128, output: u128, price: &Price) -> u64 {
    let total = uncached * price.input_nanousd_per_mtok as u128
        + cached * price.cached_input_nanousd_per_mtok as u128
        + output * price.output_nanousd_per_mtok as u128;
    total.div_ceil(1_000_000).min(u64::MAX as u128) as u64
}

/// Cost of `input` uncached prompt tokens and `output` tokens at `price`, rounded up
/// to the next nano-USD; in 64 bits, for worst cases (a client's `max_tokens` may be
/// far above what a [`Usage`] holds).
pub fn worst_cost_nanousd(input: u64, output: u64, price: &Price) -> u64 {
    priced(u128::from(input), 0, u128::from(output), price)
}

/// The bill for a call whose upstream answered `upstream_status`.
///
/// `prompt_bytes` is the size of the prompt as sent, for the input estimate.
pub fn bill(
    completion: &Completion,
    upstream_status: u16,
    prompt_bytes: usize,
    price: &Price,
) -> Bill {
    if upstream_status != 200 {
        // Providers do not bill refused or failed calls.
        return Bill::default();
    }
    let (usage, estimated) = match completion.usage {
        Some(u) if completion.complete => (u, false),
        reported => {
            let u = reported.unwrap_or_default();
            let input = if u.input > 0 {
                u.input
            } else {
                estimate_tokens(prompt_bytes)
            };
            let output = u.output.max(estimate_tokens(completion.content_bytes));
            (Usage { input, output, ..u }, true)
        }
    };
    Bill {
        cost_nanousd: cost_nanousd(&usage, price),
        usage,
        estimated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price() -> Price {
        // gpt-4o-mini: $0.15 / $0.60 / $0.075 per million tokens.
        Price {
            input_nanousd_per_mtok: 150_000_000,
            output_nanousd_per_mtok: 600_000_000,
            cached_input_nanousd_per_mtok: 75_000_000,
        }
    }

    fn usage(input: u32, output: u32, cached_input: u32) -> Usage {
        Usage {
            input,
            output,
            cached_input,
            ..Usage::default()
        }
    }

    #[test]
    fn exact_cost_in_nanousd() {
        // 1000 in (200 cached), 500 out:
        // 800 * 150 + 200 * 75 + 500 * 600 = 120_000 + 15_000 + 300_000 nano-USD.
        assert_eq!(cost_nanousd(&usage(1000, 500, 200), &price()), 435_000);
        // A million output tokens cost exactly the list price.
        assert_eq!(cost_nanousd(&usage(0, 1_000_000, 0), &price()), 600_000_000);
        // Fractions of a nano-USD round up, never down to free.
        let cheap = Price {
            input_nanousd_per_mtok: 1,
            output_nanousd_per_mtok: 1,
            cached_input_nanousd_per_mtok: 1,
        };
        assert_eq!(cost_nanousd(&usage(1, 0, 0), &cheap), 1);
    }

    #[test]
    fn reported_usage_wins_when_complete() {
        let c = Completion {
            usage: Some(usage(10, 20, 0)),
            complete: true,
            upstream_error: false,
            content_bytes: 9999,
        };
        let b = bill(&c, 200, 1_000_000, &price());
        assert!(!b.estimated);
        assert_eq!(b.usage, usage(10, 20, 0));
    }

    #[test]
    fn cut_stream_without_usage_is_estimated_never_free() {
        let c = Completion {
            usage: None,
            complete: false,
            upstream_error: false,
            content_bytes: 401,
        };
        let b = bill(&c, 200, 4000, &price());
        assert!(b.estimated);
        assert_eq!(b.usage.input, 1000);
        assert_eq!(b.usage.output, 101);
        assert!(b.cost_nanousd > 0);
    }

    #[test]
    fn partial_anthropic_usage_keeps_the_reported_input() {
        let c = Completion {
            usage: Some(usage(77, 1, 0)),
            complete: false,
            upstream_error: true,
            content_bytes: 40,
        };
        let b = bill(&c, 200, 4000, &price());
        assert!(b.estimated);
        assert_eq!((b.usage.input, b.usage.output), (77, 10));
    }

    #[test]
    fn failed_calls_cost_nothing() {
        let c = Completion::default();
        assert_eq!(bill(&c, 503, 4000, &price()), Bill::default());
    }
}
