//! One tokenized example, as the trainer takes it: a row of token ids and the labels to learn
//! (SFT, pretraining text, packed rows), or, for preference training, two rows sharing a prompt
//! ([`Pref`]): a pair's chosen and rejected answers, or a KTO answer and the mismatched completion
//! its KL estimate uses.

/// Label of tokens the loss ignores (HF's `ignore_index`).
pub const IGNORE: i64 = -100;

/// One tokenized example.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Ids to learn, -100 elsewhere.
    pub labels: Vec<i64>,
    /// When this row packs several examples ([`crate::data::batch::pack`]): where each one after
    /// the first starts. Empty for one example.
    pub packed: Vec<usize>,
    /// Preference training: the second row and what the objective needs (`None`: one row).
    pub pref: Option<Box<Pref>>,
}

/// What a preference example carries beside its first row (`input_ids`, `labels`: the chosen
/// answer of a pair, or KTO's answer).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pref {
    /// Tokens of the prompt both rows start with (tokenized once).
    pub prompt_len: usize,
    /// The second row's ids: the rejected answer of a pair, or (KTO) this prompt followed by
    /// another record's completion, for the KL estimate.
    pub second_ids: Vec<u32>,
    /// The second row's labels.
    pub second_labels: Vec<i64>,
    /// KTO: whether the answer is desirable; `None` for a pair.
    pub desirable: Option<bool>,
    /// The reference model's log-probability of each row's learned tokens, once computed.
    pub ref_logps: Option<[f64; 2]>,
}

impl Example {
    /// One row of `input_ids` and `labels`.
    pub fn new(input_ids: Vec<u32>, labels: Vec<i64>) -> Self {
        Self {
            input_ids,
            labels,
            ..Self::default()
        }
    }

    /// Tokens of the row it takes in a batch: its own, or a preference example's prompt once
    /// and both answers ([`super::pair_rows`]).
    pub fn row_len(&self) -> usize {
        self.tokens() - self.shared_len()
    }

    /// The tokens a preference example's two rows start with alike (0 for one row): its batch
    /// row keeps the first row whole and the second from there on.
    pub fn shared_len(&self) -> usize {
        self.pref.as_ref().map_or(0, |p| {
            self.input_ids
                .iter()
                .zip(&p.second_ids)
                .take_while(|(a, b)| a == b)
                .count()
        })
    }

    /// Its longest row's tokens (what `max_length` cuts).
    pub fn longest(&self) -> usize {
        let second = self.pref.as_ref().map_or(0, |p| p.second_ids.len());
        self.input_ids.len().max(second)
    }

    /// Its tokens over every row.
    pub fn tokens(&self) -> usize {
        self.input_ids.len() + self.pref.as_ref().map_or(0, |p| p.second_ids.len())
    }

    /// Every row cut to `max` tokens.
    pub fn truncate(&mut self, max: usize) {
        self.input_ids.truncate(max);
        self.labels.truncate(max);
        if let Some(p) = &mut self.pref {
            p.second_ids.truncate(max);
            p.second_labels.truncate(max);
        }
    }
}
