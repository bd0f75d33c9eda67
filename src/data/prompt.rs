//! The Alpaca prompt (Stanford Alpaca's `PROMPT_DICT`), so instruction data trains in the format
//! the instruction-tuning literature and its evaluators use.

const WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input \
that provides further context. Write a response that appropriately completes the request.\n\n";

const WITHOUT_INPUT: &str =
    "Below is an instruction that describes a task. Write a response that appropriately \
completes the request.\n\n";

/// The prompt for `instruction` (and `input`, when not empty); the response follows it directly.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!("{WITHOUT_INPUT}### Instruction:\n{instruction}\n\n### Response:\n")
    } else {
        format!(
            "{WITH_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_stanford_alpaca_templates() {
        assert_eq!(
            alpaca_prompt("Add 2 and 3.", ""),
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
        );
        assert_eq!(
            alpaca_prompt("Add the numbers.", "2, 3"),
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\nAdd the numbers.\n\n### Input:\n2, 3\n\n### Response:\n"
        );
    }
}
