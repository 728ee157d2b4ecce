//! The OpenAI API's requests as the server takes them: each body read into a [`Request`] with
//! every option checked (its name and valid range in the error), and the errors as OpenAI's
//! JSON (`{"error": {"message", "type", "param", "code"}}`) with their HTTP status.

use serde_json::{Map, Value, json};

/// An error as OpenAI's API returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// What went wrong, for a person.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `server_error`.
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `context_length_exceeded`, ...).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: `param` is wrong.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }

    /// 400 with a code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 404: no served model has this name.
    pub fn unknown_model(name: &str, served: &[String]) -> Self {
        Self {
            status: 404,
            message: format!(
                "The model `{name}` does not exist; this server serves: {}",
                served.join(", ")
            ),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// 401: a missing or wrong API key.
    pub fn unauthorized() -> Self {
        Self {
            status: 401,
            message: "Incorrect or missing API key: send `Authorization: Bearer <key>` with the key the server was started with (`--api-key`)".into(),
            kind: "authentication_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    /// 404 for a path the server does not have.
    pub fn no_route(method: &str, path: &str) -> Self {
        Self {
            status: 404,
            message: format!(
                "No route {method} {path}; this server has POST /v1/chat/completions, POST /v1/completions, GET /v1/models and GET /health"
            ),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url"),
        }
    }

    /// 500: the engine failed on this request.
    pub fn server(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// What to generate after.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Chat messages, rendered with the model's chat template; `extra` goes into the
    /// template's context (vLLM's `chat_template_kwargs`, e.g. `enable_thinking`).
    Chat {
        /// `[{role, content}]`, content as text.
        messages: Value,
        /// Template variables.
        extra: Map<String, Value>,
    },
    /// Plain text (`/v1/completions`).
    Text(String),
}

/// A chat or completion request, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The served model's name.
    pub model: String,
    /// The prompt.
    pub prompt: Prompt,
    /// `max_tokens` (`max_completion_tokens`); `None`: up to the context.
    pub max_tokens: Option<usize>,
    /// 0 = greedy; `None`: the model's generation config.
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
    /// vLLM's `top_k` (`-1` or absent: none).
    pub top_k: Option<usize>,
    /// vLLM's `repetition_penalty`.
    pub repetition_penalty: Option<f32>,
    /// Text that ends the reply (not included in it).
    pub stop: Vec<String>,
    /// The sampling seed.
    pub seed: Option<u64>,
    /// Server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// vLLM's `ignore_eos`: `max_tokens` new tokens whatever comes (benchmarks).
    pub ignore_eos: bool,
    /// Choices to generate for the prompt (`n`), each its own sequence.
    pub n: usize,
    /// Each new token's log-probability with this many most likely alternatives (chat:
    /// `logprobs: true` and `top_logprobs`; completions: `logprobs: N`); `None`: none.
    pub logprobs: Option<usize>,
}

/// The most alternatives a token's log-probabilities list (`top_logprobs`, completions'
/// `logprobs`), OpenAI's chat limit.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The most choices a request may ask for (`n`).
pub const MAX_N: usize = 16;

/// The most stop strings a request may give (OpenAI's limit).
pub const MAX_STOPS: usize = 4;

/// A `/v1/chat/completions` body.
pub fn chat(body: &[u8]) -> Result<Request, ApiError> {
    let o = object(body)?;
    let messages = match o.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "messages",
                "`messages` is empty; give at least one message",
            ));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "messages",
                "`messages` must be an array of {role, content} objects",
            ));
        }
        None => return Err(missing("messages")),
    };
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        out.push(message(i, m)?);
    }
    let extra = match o.get("chat_template_kwargs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                "chat_template_kwargs",
                "`chat_template_kwargs` must be an object of template variables",
            ));
        }
    };
    if let Some(t) = o.get("tools").filter(|t| !t.is_null())
        && t.as_array().is_none_or(|a| !a.is_empty())
    {
        return Err(ApiError::invalid(
            "tools",
            "`tools` is not supported by this server",
        ));
    }
    if let Some(f) = o.get("response_format").filter(|f| !f.is_null())
        && f.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(ApiError::invalid(
            "response_format",
            "only `response_format: {\"type\": \"text\"}` is supported",
        ));
    }
    let max = o
        .get("max_completion_tokens")
        .map(|_| "max_completion_tokens");
    options(
        &o,
        Prompt::Chat {
            messages: Value::Array(out),
            extra,
        },
        max.unwrap_or("max_tokens"),
    )
}

/// A `/v1/completions` body.
pub fn completion(body: &[u8]) -> Result<Request, ApiError> {
    let o = object(body)?;
    let prompt = match o.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid(
                "prompt",
                "`prompt` must be one string (a list of prompts or of token ids is not supported)",
            ));
        }
        Some(_) => return Err(ApiError::invalid("prompt", "`prompt` must be a string")),
        None => return Err(missing("prompt")),
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` is empty"));
    }
    if o.get("echo").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::invalid("echo", "`echo` is not supported"));
    }
    if o.get("suffix").is_some_and(|s| !s.is_null()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    options(&o, Prompt::Text(prompt), "max_tokens")
}

/// The body as a JSON object.
fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(ApiError::invalid(
            "body",
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::invalid(
            "body",
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

fn missing(param: &str) -> ApiError {
    ApiError::invalid(param, format!("`{param}` is required"))
}

/// Message `i` as the template takes it: `role` and `content` text (OpenAI's list of text
/// parts joined), other fields kept.
fn message(i: usize, m: &Value) -> Result<Value, ApiError> {
    let param = format!("messages[{i}]");
    let Some(o) = m.as_object() else {
        return Err(ApiError::invalid(
            &param,
            format!("`{param}` must be an object with `role` and `content`"),
        ));
    };
    match o.get("role").and_then(Value::as_str) {
        Some("system" | "user" | "assistant" | "developer" | "tool") => {}
        Some(r) => {
            return Err(ApiError::invalid(
                &format!("{param}.role"),
                format!(
                    "`{param}.role` is `{r}`; expected system, user, assistant, developer or tool"
                ),
            ));
        }
        None => return Err(missing(&format!("{param}.role"))),
    }
    let content = match o.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            &format!("{param}.content[{j}]"),
                            format!(
                                "`{param}.content[{j}]` is not a text part; this server takes text only"
                            ),
                        ));
                    }
                }
            }
            text
        }
        Some(_) => {
            return Err(ApiError::invalid(
                &format!("{param}.content"),
                format!("`{param}.content` must be a string or a list of text parts"),
            ));
        }
    };
    let mut out = o.clone();
    out.insert("content".into(), Value::String(content));
    Ok(Value::Object(out))
}

/// The options both endpoints share.
fn options(o: &Map<String, Value>, prompt: Prompt, max_name: &str) -> Result<Request, ApiError> {
    let model = match o.get("model") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(ApiError::invalid("model", "`model` must be a string")),
        None => return Err(missing("model")),
    };
    let num = |k: &str| -> Result<Option<f64>, ApiError> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| ApiError::invalid(k, format!("`{k}` must be a number"))),
        }
    };
    let int = |k: &str| -> Result<Option<i64>, ApiError> {
        match o.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| ApiError::invalid(k, format!("`{k}` must be an integer"))),
        }
    };
    let max_tokens = match int(max_name)? {
        None => None,
        Some(n) if n >= 1 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        Some(n) => {
            return Err(ApiError::invalid(
                max_name,
                format!("`{max_name}` must be at least 1, got {n}"),
            ));
        }
    };
    let temperature = num("temperature")?;
    if let Some(t) = temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ApiError::invalid(
            "temperature",
            format!("`temperature` must be between 0 and 2, got {t}"),
        ));
    }
    let top_p = num("top_p")?;
    if let Some(p) = top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::invalid(
            "top_p",
            format!("`top_p` must be in (0, 1], got {p}"),
        ));
    }
    let top_k = match int("top_k")? {
        None | Some(-1) => None,
        Some(k) if k >= 1 => Some(usize::try_from(k).unwrap_or(usize::MAX)),
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("`top_k` must be at least 1 (or -1 for none), got {k}"),
            ));
        }
    };
    let repetition_penalty = num("repetition_penalty")?;
    if let Some(r) = repetition_penalty
        && !(r > 0.0 && r <= 10.0)
    {
        return Err(ApiError::invalid(
            "repetition_penalty",
            format!("`repetition_penalty` must be in (0, 10], got {r}"),
        ));
    }
    let n = match int("n")? {
        None => 1,
        Some(n) if (1..=MAX_N as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                "n",
                format!("`n` must be in 1..={MAX_N} (choices a request), got {n}"),
            ));
        }
    };
    for k in ["presence_penalty", "frequency_penalty"] {
        if num(k)?.is_some_and(|v| v != 0.0) {
            return Err(ApiError::invalid(
                k,
                format!("`{k}` is not supported (use `repetition_penalty`)"),
            ));
        }
    }
    let logprobs = logprobs(o, &prompt)?;
    let stop = match o.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            let mut v = Vec::with_capacity(a.len());
            for s in a {
                match s.as_str() {
                    Some(s) => v.push(s.to_string()),
                    None => {
                        return Err(ApiError::invalid(
                            "stop",
                            "`stop` must be a string or a list of strings",
                        ));
                    }
                }
            }
            v
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "`stop` must be a string or a list of strings",
            ));
        }
    };
    if stop.len() > MAX_STOPS || stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "`stop` takes at most {MAX_STOPS} non-empty strings, got {}",
                stop.len()
            ),
        ));
    }
    // OpenAI's seed is any 64-bit integer; its bits seed the generator.
    let seed = int("seed")?.map(|s| s as u64);
    let stream = match o.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid(
                "stream",
                "`stream` must be true or false",
            ));
        }
    };
    let include_usage = o
        .get("stream_options")
        .and_then(|s| s.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let ignore_eos = match o.get("ignore_eos") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid(
                "ignore_eos",
                "`ignore_eos` must be true or false",
            ));
        }
    };
    Ok(Request {
        ignore_eos,
        n,
        logprobs,
        model,
        prompt,
        max_tokens,
        temperature,
        top_p,
        top_k,
        repetition_penalty: repetition_penalty.map(|r| r as f32),
        stop,
        seed,
        stream,
        include_usage,
    })
}

/// The log-probabilities asked for: chat's `logprobs` (true or false) with `top_logprobs`
/// (0..=20, only with `logprobs: true`), completions' `logprobs` (0..=20 alternatives).
fn logprobs(o: &Map<String, Value>, prompt: &Prompt) -> Result<Option<usize>, ApiError> {
    let count = |k: &str, v: &Value| -> Result<usize, ApiError> {
        match v.as_i64() {
            Some(n) if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) => Ok(n as usize),
            _ => Err(ApiError::invalid(
                k,
                format!("`{k}` must be an integer in 0..={MAX_TOP_LOGPROBS}, got {v}"),
            )),
        }
    };
    let get = |k: &str| o.get(k).filter(|v| !v.is_null());
    match prompt {
        Prompt::Chat { .. } => {
            let on = match get("logprobs") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(ApiError::invalid(
                        "logprobs",
                        format!("`logprobs` must be true or false, got {v}"),
                    ));
                }
            };
            match get("top_logprobs") {
                None => Ok(on.then_some(0)),
                Some(v) => {
                    let n = count("top_logprobs", v)?;
                    if !on {
                        return Err(ApiError::invalid(
                            "top_logprobs",
                            "`top_logprobs` needs `logprobs: true`",
                        ));
                    }
                    Ok(Some(n))
                }
            }
        }
        Prompt::Text(_) => get("logprobs")
            .filter(|v| **v != Value::Bool(false))
            .map(|v| count("logprobs", v))
            .transpose(),
    }
}
