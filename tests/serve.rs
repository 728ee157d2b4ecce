//! `qscript serve` and the OpenAI-compatible server: routes, streaming, errors, concurrent
//! clients (continuous batching gives each stream exactly its own tokens), clients that leave,
//! adapters under their own names. A tiny model on the CPU, talked to over HTTP as clients do.
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::Duration;

use qscript_runtime::cancel::CancelToken;
use qscript_runtime::model::generate::GenerateOptions;
use qscript_runtime::model::load::Model;
use qscript_runtime::model::tiny::{TinyConfig, tiny};
use qscript_runtime::serve::{ServeOptions, ServedModel, Server};
use qscript_runtime::tokenizer::{TemplateOptions, Tokenizer};
use serde_json::{Value, json};

const KEY: &str = "sk-test";

fn base() -> Model {
    tiny(&TinyConfig {
        seed: 3,
        embed_std: 1.0,
        ..TinyConfig::default()
    })
    .unwrap()
}

/// The base with a LoRA adapter of fixed, non-zero values (a fresh adapter changes nothing).
fn adapted(m: &Model) -> Model {
    let cfg = qscript_runtime::lora::LoraConfig {
        r: 4,
        target_modules: qscript_runtime::lora::Targets::Pattern("all-linear".into()),
        ..qscript_runtime::lora::LoraConfig::default()
    };
    let mut peft = qscript_runtime::lora::attach(m, &cfg, 1).unwrap();
    let mut k = 0usize;
    qscript_runtime::model::params::visit_adapters_mut(&mut peft.decoder, &mut |_, t| {
        k += 1;
        let v: Vec<f32> = (0..t.elem_count())
            .map(|i| 0.5 * ((i * 7 + k * 13) as f32 * 0.61).sin())
            .collect();
        *t = candle_core::Tensor::from_vec(v, t.shape(), t.device())?;
        Ok(())
    })
    .unwrap();
    peft
}

struct Fixture {
    server: Server,
    base: Model,
    adapted: Model,
    tok: Tokenizer,
    agent: ureq::Agent,
}

fn start(max_seqs: usize, max_len: Option<usize>) -> Fixture {
    let base = base();
    let adapted = adapted(&base);
    let tok = Tokenizer::builtin().unwrap();
    let models = vec![
        Arc::new(ServedModel::new("tiny", base.clone())),
        Arc::new(ServedModel::new("tiny-lora", adapted.clone())),
    ];
    let opts = ServeOptions {
        port: 0,
        api_key: Some(KEY.into()),
        max_seqs,
        max_len,
        max_body: 64 << 10,
        ..ServeOptions::default()
    };
    let server = Server::start(models, Arc::new(Tokenizer::builtin().unwrap()), &opts).unwrap();
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_mins(2)))
        .build()
        .new_agent();
    Fixture {
        server,
        base,
        adapted,
        tok,
        agent,
    }
}

impl Fixture {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.addr)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut r = self
            .agent
            .post(&self.url(path))
            .header("Authorization", &format!("Bearer {KEY}"))
            .send_json(body)
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_json().unwrap())
    }

    fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let mut r = self
            .agent
            .post(&self.url(path))
            .header("Authorization", &format!("Bearer {KEY}"))
            .header("Content-Type", "application/json")
            .send(body)
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_json().unwrap())
    }

    fn get(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        let mut req = self.agent.get(&self.url(path));
        if let Some(k) = key {
            req = req.header("Authorization", &format!("Bearer {k}"));
        }
        let mut r = req.call().unwrap();
        (r.status().as_u16(), r.body_mut().read_json().unwrap())
    }

    /// The `data:` payloads of a streamed request, `[DONE]` included.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = self
            .agent
            .post(&self.url(path))
            .header("Authorization", &format!("Bearer {KEY}"))
            .send_json(body)
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let reader = BufReader::new(r.into_body().into_reader());
        reader
            .lines()
            .map(Result::unwrap)
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }

    /// The chat log-probability entries of a streamed request, over all its chunks in order.
    fn streamed_logprobs(&self, body: &Value) -> Vec<Value> {
        let events = self.stream("/v1/chat/completions", body);
        events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str::<Value>(e).unwrap())
            .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
            .flatten()
            .collect()
    }

    /// What the model alone generates (greedy) after `ids`, decoded as the server decodes.
    fn alone(&self, m: &Model, ids: &[u32], max: usize) -> (String, usize, bool) {
        let mut stop_ids: Vec<u32> = self.tok.eos_id().into_iter().collect();
        stop_ids.extend(self.tok.token_to_id("<|im_end|>"));
        let opts = GenerateOptions {
            max_new_tokens: max,
            stop_ids: stop_ids.clone(),
            temperature: Some(0.0),
            ..GenerateOptions::default()
        };
        let out = m
            .generate(ids, &opts, &CancelToken::new(), &mut |_| Ok(()))
            .unwrap();
        let stopped = out
            .last()
            .is_some_and(|t| stop_ids.contains(t) || m.eos_ids().contains(t));
        (self.tok.decode(&out, true).unwrap(), out.len(), stopped)
    }

    fn chat_ids(&self, text: &str) -> Vec<u32> {
        let msgs = json!([{"role": "user", "content": text}]);
        let opts = TemplateOptions {
            add_generation_prompt: true,
            extra: serde_json::Map::new(),
        };
        let rendered = self.tok.apply_chat_template(&msgs, &opts).unwrap();
        self.tok.encode(&rendered, false).unwrap()
    }
}

fn chat_body(model: &str, text: &str, max: usize) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}],
           "max_tokens": max, "temperature": 0})
}

/// Chat and text completions, streamed and not, for the base and an adapter, equal what the
/// model generates alone; models, health and the API key answer as OpenAI's API does.
#[test]
fn routes_answer_as_the_openai_api_does() {
    let f = start(4, None);
    let (s, e) = f.get("/health", None);
    assert_eq!(s, 401, "{e}");
    assert_eq!(e["error"]["code"], "invalid_api_key");
    assert_eq!(f.get("/health", Some("wrong")).0, 401);
    let (s, h) = f.get("/health", Some(KEY));
    assert_eq!((s, h["status"].as_str()), (200, Some("ok")));
    let (s, m) = f.get("/v1/models", Some(KEY));
    assert_eq!(s, 200);
    let ids: Vec<&str> = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "tiny-lora"]);
    assert_eq!(m["object"], "list");

    for (name, model) in [("tiny", &f.base), ("tiny-lora", &f.adapted)] {
        let (s, r) = f.post("/v1/chat/completions", &chat_body(name, "hello there", 12));
        assert_eq!(s, 200, "{r}");
        assert_eq!(r["object"], "chat.completion");
        assert_eq!(r["model"], name);
        let (want, n, stopped) = f.alone(model, &f.chat_ids("hello there"), 12);
        let got = r["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(got, want, "{name}");
        assert_eq!(r["choices"][0]["message"]["role"], "assistant");
        assert_eq!(
            r["choices"][0]["finish_reason"],
            if stopped { "stop" } else { "length" }
        );
        let prompt = f.chat_ids("hello there").len();
        assert_eq!(
            r["usage"],
            json!({"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n})
        );

        // The same, streamed: a role first, deltas, the finish reason, usage, [DONE].
        let mut body = chat_body(name, "hello there", 12);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let events = f.stream("/v1/chat/completions", &body);
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk")
        );
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, want);
        let usage = chunks.last().unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], n);
        let fin = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
        assert_eq!(fin, if stopped { "stop" } else { "length" });
    }
    assert_ne!(
        f.alone(&f.base, &f.chat_ids("hello there"), 12).0,
        f.alone(&f.adapted, &f.chat_ids("hello there"), 12).0,
        "the adapter changes the reply"
    );

    // Text completions take the prompt as it is.
    let (s, r) = f.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "Once upon", "max_tokens": 9, "temperature": 0}),
    );
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    let ids = f.tok.encode("Once upon", true).unwrap();
    assert_eq!(r["choices"][0]["text"], f.alone(&f.base, &ids, 9).0);
    let events = f.stream(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "Once upon", "max_tokens": 9, "temperature": 0, "stream": true}),
    );
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, f.alone(&f.base, &ids, 9).0);

    // A stop string ends the reply before it.
    let (full, _, _) = f.alone(&f.base, &ids, 9);
    let chars: Vec<char> = full.chars().collect();
    if chars.len() >= 4 && !chars[2].is_whitespace() {
        let stop: String = chars[2..4].iter().collect();
        let cut = full.find(&stop).unwrap();
        let (s, r) = f.post(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "Once upon", "max_tokens": 9, "temperature": 0, "stop": [stop]}),
        );
        assert_eq!(s, 200, "{r}");
        assert_eq!(r["choices"][0]["text"], &full[..cut]);
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
    }

    // Sampling with a seed repeats itself.
    let sampled = json!({"model": "tiny", "prompt": "Once upon", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 7});
    let a = f.post("/v1/completions", &sampled).1;
    let b = f.post("/v1/completions", &sampled).1;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
}

/// Each bad request gets OpenAI's error body and status, naming the field and its range, and
/// the server goes on serving.
#[test]
fn bad_requests_get_openai_errors_and_disturb_nothing() {
    let f = start(2, Some(64));
    let cases: Vec<(&str, String, u16, &str, &str)> = vec![
        ("/v1/chat/completions", "{\"model\": \"tiny\", \"messages\": [".into(), 400, "body", "not valid JSON"),
        ("/v1/chat/completions", "[1, 2]".into(), 400, "body", "JSON object"),
        ("/v1/chat/completions", chat_body("gpt-4", "hi", 4).to_string(), 404, "model", "`gpt-4` does not exist"),
        ("/v1/chat/completions", json!({"model": "tiny"}).to_string(), 400, "messages", "`messages` is required"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": []}).to_string(), 400, "messages", "empty"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}).to_string(), 400, "messages[0].role", "`robot`"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}).to_string(), 400, "max_tokens", "at least 1, got -5"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 3}).to_string(), 400, "temperature", "between 0 and 2"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": 0}).to_string(), 400, "top_p", "(0, 1]"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 17}).to_string(), 400, "n", "must be in 1..=16"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}).to_string(), 400, "stop", "at most 4"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "x".repeat(200)}]}).to_string(), 400, "messages", "maximum context length is 64"),
        ("/v1/completions", json!({"model": "tiny", "prompt": 5}).to_string(), 400, "prompt", "must be a string"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}).to_string(), 400, "top_logprobs", "in 0..=20, got 21"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}).to_string(), 400, "top_logprobs", "needs `logprobs: true`"),
        ("/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": 3}).to_string(), 400, "logprobs", "true or false"),
        ("/v1/completions", json!({"model": "tiny", "prompt": "x", "logprobs": -1}).to_string(), 400, "logprobs", "in 0..=20, got -1"),
        ("/v1/completions", json!({"model": "tiny-lora-2", "prompt": "x"}).to_string(), 404, "model", "serves: tiny, tiny-lora"),
    ];
    for (path, body, status, param, says) in &cases {
        let (s, e) = f.post_raw(path, body);
        assert_eq!(s, *status, "{body}: {e}");
        assert_eq!(e["error"]["param"], *param, "{body}: {e}");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{body}: {msg}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }
    let (s, e) = f.post_raw(
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "user", "content": "x".repeat(200)}]})
            .to_string(),
    );
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("context_length_exceeded"))
    );
    let (s, e) = f.get("/v2/nothing", Some(KEY));
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("unknown_url")));
    // A body past the limit (64 KiB here) is a JSON error too (413). One byte over: the server
    // reads it all before it answers, so the client is never cut off mid-write.
    let head = "{\"model\": \"tiny\", \"prompt\": \"";
    let big = format!("{head}{}\"}}", "x".repeat((64 << 10) + 1 - head.len() - 2));
    assert_eq!(big.len(), (64 << 10) + 1);
    let (s, e) = f.post_raw("/v1/completions", &big);
    assert_eq!(s, 413, "{e}");
    assert_eq!(e["error"]["param"], "body");
    // A reply that would pass the context stops there ("length").
    let (s, r) = f.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "x".repeat(50), "max_tokens": 1000, "temperature": 0}),
    );
    assert_eq!(s, 200, "{r}");
    let n = r["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n <= 14, "{r}");
    // Still serving.
    let (s, r) = f.post("/v1/chat/completions", &chat_body("tiny", "hi", 4));
    assert_eq!(s, 200, "{r}");
}

/// Concurrent clients of both models, batched into shared decode steps, each get exactly the
/// tokens they get alone.
#[test]
fn concurrent_streams_each_get_their_own_tokens() {
    let f = Arc::new(start(6, None));
    let prompts: Vec<(String, &str)> = (0..10)
        .map(|i| {
            (
                format!("request number {i}: {}", "ab".repeat(i)),
                if i % 3 == 0 { "tiny-lora" } else { "tiny" },
            )
        })
        .collect();
    let want: Vec<String> = prompts
        .iter()
        .map(|(p, m)| {
            let model = if *m == "tiny" { &f.base } else { &f.adapted };
            f.alone(model, &f.chat_ids(p), 20 + p.len() % 7).0
        })
        .collect();
    let handles: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|(p, m)| {
            let f = f.clone();
            std::thread::spawn(move || {
                let mut body = chat_body(m, &p, 20 + p.len() % 7);
                body["stream"] = json!(true);
                let events = f.stream("/v1/chat/completions", &body);
                events[..events.len() - 1]
                    .iter()
                    .map(|e| serde_json::from_str::<Value>(e).unwrap())
                    .filter_map(|c| {
                        c["choices"][0]["delta"]["content"]
                            .as_str()
                            .map(str::to_string)
                    })
                    .collect::<String>()
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), want[i], "client {i}");
    }
}

/// A client that disconnects mid-stream frees its sequence: a server of one slot serves the
/// next request.
#[test]
fn a_client_that_leaves_mid_stream_frees_its_slot() {
    let f = start(1, Some(256));
    {
        let body = json!({"model": "tiny", "prompt": "go on", "max_tokens": 200, "temperature": 0, "stream": true});
        let r = f
            .agent
            .post(&f.url("/v1/completions"))
            .header("Authorization", &format!("Bearer {KEY}"))
            .send_json(&body)
            .unwrap();
        let mut reader = BufReader::new(r.into_body().into_reader());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("data: "), "{line}");
        // Dropped here: the connection closes.
    }
    let (s, r) = f.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "next", "max_tokens": 3}),
    );
    assert_eq!(s, 200, "{r}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while f.get("/health", Some(KEY)).1["running"] != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the sequence never ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `qscript serve DIR` serves on the port it prints, and Ctrl-C stops it cleanly; a missing
/// model is an error naming it.
#[test]
fn the_serve_command_serves_until_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    base().save(dir.path()).unwrap();
    Tokenizer::builtin().unwrap().save(dir.path()).unwrap();
    let adapter = dir.path().join("adapter");
    qscript_runtime::lora::save_adapter(&adapted(&base()), &adapter).unwrap();
    let bin = env!("CARGO_BIN_EXE_qscript");
    let mut child = std::process::Command::new(bin)
        .args([
            "serve",
            dir.path().to_str().unwrap(),
            "--port",
            "0",
            "--device",
            "cpu",
        ])
        .arg("--lora-modules")
        .arg(format!("mine={}", adapter.display()))
        .args(["--served-model-name", "base"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut r = agent
        .get(&format!("http://{addr}/v1/models"))
        .call()
        .unwrap();
    let m: Value = r.body_mut().read_json().unwrap();
    assert_eq!(m["data"][0]["id"], "base");
    assert_eq!(m["data"][1]["id"], "mine");
    let mut r = agent
        .post(&format!("http://{addr}/v1/chat/completions"))
        .send_json(chat_body("mine", "hi", 3))
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let _: Value = r.body_mut().read_json().unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::INT,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());

    let out = std::process::Command::new(bin)
        .args(["serve", "/nonexistent/model", "--port", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("/nonexistent/model"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
}

/// A recipe serves the model it trains: requests during `train::fit` are answered (each from
/// one optimizer step's weights), the replies change as it learns, and at the end the server
/// answers as the returned model does.
#[test]
fn a_recipe_serves_its_model_while_it_trains() {
    let env = support::Env::new();
    let mut s = env.session();
    s.eval(
        r#"
        let peft = lora::attach(model::tiny(#{ seed: 3 }), #{ r: 8, lora_alpha: 32, target_modules: "all-linear" });
        let srv = peft.serve(#{ port: 0, name: "live" });
        io::write_text("d.json", `[{"instruction": "Once upon", "output": "a time there was a cat"},
                                   {"instruction": "Tell me", "output": "a story about a cat"}]`);
        let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/d.json")), tokenizer::builtin());
        "#,
    )
    .unwrap();
    let out = env.sink.take();
    let url = out
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no url in {out}"))
        .to_string();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poll = {
        let (url, done) = (url.clone(), done.clone());
        std::thread::spawn(move || {
            let agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .new_agent();
            let mut replies = Vec::new();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let mut r = agent
                    .post(&format!("{url}/v1/completions"))
                    .send_json(json!({"model": "live", "prompt": "Once upon", "max_tokens": 8, "temperature": 0}))
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200);
                let v: Value = r.body_mut().read_json().unwrap();
                replies.push(v["choices"][0]["text"].as_str().unwrap().to_string());
            }
            replies
        })
    };
    s.eval(
        r#"
        let trained = train::fit(peft, ds, #{ max_steps: 40, learning_rate: 3e-2, save_steps: 0, logging_steps: 100 });
        print("FINAL[" + trained.generate(tokenizer::builtin(), "Once upon", #{ max_new_tokens: 8 }) + "]");
        "#,
    )
    .unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let replies = poll.join().unwrap();
    let out = env.sink.take();
    let want = out
        .split("FINAL[")
        .nth(1)
        .and_then(|r| r.rsplit_once(']'))
        .map_or_else(|| panic!("no final reply in {out}"), |(t, _)| t.to_string());
    let mut distinct = replies.clone();
    distinct.dedup();
    assert!(
        distinct.len() >= 2,
        "the served replies never changed: {replies:?}"
    );
    let agent = ureq::Agent::new_with_defaults();
    let v: Value = agent
        .post(&format!("{url}/v1/completions"))
        .send_json(
            json!({"model": "live", "prompt": "Once upon", "max_tokens": 8, "temperature": 0}),
        )
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    assert_eq!(v["choices"][0]["text"], want.as_str());
}

/// A served model with a tokenizer of its own (an adapter saved with the template it was trained
/// with) renders chats with its template; the others keep the server's.
#[test]
fn an_adapter_renders_with_its_own_tokenizer() {
    let base = base();
    let adapted = adapted(&base);
    let mut own = Tokenizer::builtin().unwrap();
    own.chat_template =
        Some("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}>".into());
    let own = Arc::new(own);
    let models = vec![
        Arc::new(ServedModel::new("tiny", base.clone())),
        Arc::new(ServedModel::new("tuned", adapted.clone()).with_tokenizer(own.clone())),
    ];
    let opts = ServeOptions {
        port: 0,
        max_seqs: 2,
        ..ServeOptions::default()
    };
    let server = Server::start(models, Arc::new(Tokenizer::builtin().unwrap()), &opts).unwrap();
    let agent = ureq::Agent::new_with_defaults();
    let ask = |model: &str| -> Value {
        agent
            .post(&format!("http://{}/v1/chat/completions", server.addr))
            .send_json(chat_body(model, "hi", 6))
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap()
    };
    let f = Fixture {
        server: Server::start(
            vec![Arc::new(ServedModel::new("x", base.clone()))],
            Arc::new(Tokenizer::builtin().unwrap()),
            &opts,
        )
        .unwrap(),
        base: base.clone(),
        adapted: adapted.clone(),
        tok: Tokenizer::builtin().unwrap(),
        agent: ureq::Agent::new_with_defaults(),
    };
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let topts = TemplateOptions {
        add_generation_prompt: true,
        extra: serde_json::Map::new(),
    };
    let own_ids = own
        .encode(&own.apply_chat_template(&msgs, &topts).unwrap(), false)
        .unwrap();
    let r = ask("tuned");
    assert_eq!(r["usage"]["prompt_tokens"], own_ids.len());
    assert_eq!(
        r["choices"][0]["message"]["content"],
        f.alone(&adapted, &own_ids, 6).0.as_str()
    );
    let r = ask("tiny");
    assert_eq!(r["usage"]["prompt_tokens"], f.chat_ids("hi").len());
}

/// What a server cannot serve is refused before it starts, naming it: two models under one name,
/// two architectures, a context past the model's positions, no sequences.
#[test]
fn a_server_that_cannot_serve_is_refused_at_start() {
    let base = base();
    let other = qscript_runtime::model::tiny(&qscript_runtime::model::TinyConfig {
        hidden: 48,
        ..qscript_runtime::model::TinyConfig::default()
    })
    .unwrap();
    let tok = Arc::new(Tokenizer::builtin().unwrap());
    let opts = ServeOptions {
        port: 0,
        ..ServeOptions::default()
    };
    let err = |models: Vec<(&str, &Model)>, opts: &ServeOptions| -> String {
        let models = models
            .into_iter()
            .map(|(n, m)| Arc::new(ServedModel::new(n, m.clone())))
            .collect();
        match Server::start(models, tok.clone(), opts) {
            Ok(_) => panic!("started"),
            Err(e) => e.to_string(),
        }
    };
    let e = err(vec![("a", &base), ("a", &base)], &opts);
    assert!(e.contains("two served models are named `a`"), "{e}");
    let e = err(vec![("a", &base), ("b", &other)], &opts);
    assert!(e.contains("`b` is not the same architecture as `a`"), "{e}");
    let long = ServeOptions {
        max_len: Some(1 << 30),
        ..opts.clone()
    };
    let e = err(vec![("a", &base)], &long);
    assert!(e.contains("this model takes 2 to"), "{e}");
    let none = ServeOptions {
        max_seqs: 0,
        ..opts.clone()
    };
    let e = err(vec![("a", &base)], &none);
    assert!(e.contains("expected 1 to 4096"), "{e}");
}

/// `n` choices a request, whole and streamed: each choice is its own sequence (greedy: each is the
/// model's text alone), indexed 0..n, the usage counting every choice's tokens; sampled choices
/// with a seed repeat, choice i sampling with the seed + i.
#[test]
fn n_choices_are_n_sequences() {
    let f = start(8, None);
    let ids = f.chat_ids("hi");
    let (want, tokens, _) = f.alone(&f.base, &ids, 6);
    let mut body = chat_body("tiny", "hi", 6);
    body["n"] = json!(3);
    let (code, r) = f.post("/v1/chat/completions", &body);
    assert_eq!(code, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["content"], want.as_str());
    }
    assert_eq!(r["usage"]["completion_tokens"], 3 * tokens);
    // Streamed: every choice's deltas, in its own index, add up to its text.
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = f.stream("/v1/chat/completions", &body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut texts = vec![String::new(); 3];
    let mut finished = 0;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        if let Some(u) = v.get("usage") {
            assert_eq!(u["completion_tokens"], 3 * tokens);
            continue;
        }
        let c = &v["choices"][0];
        let i = c["index"].as_u64().unwrap() as usize;
        texts[i].push_str(c["delta"]["content"].as_str().unwrap_or(""));
        if !c["finish_reason"].is_null() {
            finished += 1;
        }
    }
    assert_eq!(finished, 3);
    assert!(texts.iter().all(|t| *t == want), "{texts:?}");
    // Sampled: a seed repeats the choices; the choices are not all the same.
    let sampled = json!({"model": "tiny", "prompt": "hello", "max_tokens": 8, "temperature": 1.0,
                         "seed": 5, "n": 4});
    let (_, a) = f.post("/v1/completions", &sampled);
    let (_, b) = f.post("/v1/completions", &sampled);
    let text = |r: &Value| -> Vec<String> {
        r["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(text(&a), text(&b));
    // Choice i samples with the request's seed + i: the one choice of a request seeded so.
    for (i, t) in text(&a).iter().enumerate() {
        let mut one = sampled.clone();
        one["n"] = json!(1);
        one["seed"] = json!(5 + i);
        let (_, r) = f.post("/v1/completions", &one);
        assert_eq!(text(&r), std::slice::from_ref(t));
    }
}

/// Two requests' log-probability entries: the same tokens and alternatives, the values within
/// float noise (two requests may decode in different slots and batches).
fn same_logprobs(a: &[Value], b: &[Value]) {
    assert_eq!(a.len(), b.len(), "{a:?}\n{b:?}");
    let close = |x: &Value, y: &Value| {
        assert_eq!((&x["token"], &x["bytes"]), (&y["token"], &y["bytes"]));
        let (p, q) = (
            x["logprob"].as_f64().unwrap(),
            y["logprob"].as_f64().unwrap(),
        );
        assert!((p - q).abs() < 1e-4, "{p} against {q}");
    };
    for (x, y) in a.iter().zip(b) {
        close(x, y);
        let (tx, ty) = (
            x["top_logprobs"].as_array().unwrap(),
            y["top_logprobs"].as_array().unwrap(),
        );
        assert_eq!(tx.len(), ty.len());
        tx.iter().zip(ty).for_each(|(p, q)| close(p, q));
    }
}

/// Log-probabilities (chat's `logprobs`/`top_logprobs`, completions' `logprobs: N`) are the
/// model's own: each token's equals the log-softmax of the logits of a whole-sequence forward
/// at its position, greedy picks the most likely, the alternatives come most likely first, and
/// a stream carries the same values as the whole reply, each token once.
#[test]
fn logprobs_are_the_models_own() {
    use candle_core::Tensor;
    let f = start(2, None);
    let ids = f.chat_ids("hello there");
    let mut body = chat_body("tiny", "hello there", 8);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let (s, r) = f.post("/v1/chat/completions", &body);
    assert_eq!(s, 200, "{r}");
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    let n = r["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(content.len(), n, "{r}");
    // The model's log-softmax at each generated position, from one forward of the whole text.
    let opts = GenerateOptions {
        max_new_tokens: 8,
        temperature: Some(0.0),
        stop_ids: f
            .tok
            .eos_id()
            .into_iter()
            .chain(f.tok.token_to_id("<|im_end|>"))
            .collect(),
        ..GenerateOptions::default()
    };
    let out = f
        .base
        .generate(&ids, &opts, &CancelToken::new(), &mut |_| Ok(()))
        .unwrap();
    assert_eq!(out.len(), n);
    let all: Vec<u32> = ids.iter().chain(&out).copied().collect();
    let input = Tensor::new(all.as_slice(), &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = f.base.decoder.forward(&input, None, None).unwrap();
    let logits = logits.squeeze(0).unwrap();
    for (t, e) in content.iter().enumerate() {
        let row: Vec<f32> = logits.get(ids.len() - 1 + t).unwrap().to_vec1().unwrap();
        let max = row.iter().copied().fold(f32::MIN, f32::max);
        let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
        let want = row[out[t] as usize] - lse;
        let got = e["logprob"].as_f64().unwrap() as f32;
        assert!((got - want).abs() < 1e-4, "token {t}: {got} against {want}");
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let tl: Vec<f64> = top.iter().map(|x| x["logprob"].as_f64().unwrap()).collect();
        assert!(tl.windows(2).all(|w| w[0] >= w[1]), "{tl:?}");
        assert!(
            (tl[0] as f32 - got).abs() < 1e-6,
            "greedy took the most likely"
        );
        assert_eq!(e["token"], top[0]["token"]);
        let bytes: Vec<u8> = e["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(bytes, f.tok.token_bytes(out[t]).unwrap());
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            e["token"].as_str().unwrap()
        );
    }
    // Streamed: the same entries, each once, over the chunks.
    body["stream"] = json!(true);
    let streamed = f.streamed_logprobs(&body);
    same_logprobs(&streamed, content);
    // A stop string cutting the reply: whole and streamed still carry the same entries.
    let text = r["choices"][0]["message"]["content"].as_str().unwrap();
    let cut: String = text
        .chars()
        .skip(text.chars().count() / 2)
        .take(2)
        .collect();
    if !cut.is_empty() {
        let mut stopped = body.clone();
        stopped["stream"] = json!(false);
        stopped["stop"] = json!([cut]);
        let (_, whole) = f.post("/v1/chat/completions", &stopped);
        assert_eq!(whole["choices"][0]["finish_reason"], "stop", "{whole}");
        stopped["stream"] = json!(true);
        let streamed = f.streamed_logprobs(&stopped);
        same_logprobs(
            &streamed,
            whole["choices"][0]["logprobs"]["content"]
                .as_array()
                .unwrap(),
        );
    }
    // Without the option: null.
    let (_, r) = f.post("/v1/chat/completions", &chat_body("tiny", "hello there", 4));
    assert!(r["choices"][0]["logprobs"].is_null(), "{r}");

    // Completions: tokens, their log-probabilities, N alternatives each, offsets into the text.
    let (s, r) = f.post(
        "/v1/completions",
        &json!({"model": "tiny", "prompt": "once upon", "max_tokens": 6, "temperature": 0, "logprobs": 2}),
    );
    assert_eq!(s, 200, "{r}");
    let lp = &r["choices"][0]["logprobs"];
    let n = r["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), n, "{r}");
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n);
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    // Each offset is where the token's text starts in the reply: the characters of the text
    // of the tokens before it (where that text ends on a whole character).
    let text = r["choices"][0]["text"].as_str().unwrap();
    let new_ids = f
        .base
        .generate(
            &f.tok.encode("once upon", false).unwrap(),
            &GenerateOptions {
                max_new_tokens: 6,
                temperature: Some(0.0),
                stop_ids: f.tok.eos_id().into_iter().collect(),
                ..GenerateOptions::default()
            },
            &CancelToken::new(),
            &mut |_| Ok(()),
        )
        .unwrap();
    for (t, &o) in offsets.iter().enumerate() {
        let before = f.tok.decode(&new_ids[..t], true).unwrap();
        if !before.contains('\u{FFFD}') {
            assert_eq!(o as usize, before.chars().count(), "token {t}");
            assert!(text.starts_with(&before), "{text:?} / {before:?}");
        }
    }
    for (t, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        // Two alternatives, the chosen token among them (a third where it is not).
        assert!((1..=3).contains(&top.len()), "{top:?}");
        assert!(top.contains_key(tokens[t].as_str().unwrap()), "{top:?}");
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        let chosen = lp["token_logprobs"][t].as_f64().unwrap();
        assert!(
            (best - chosen).abs() < 1e-6,
            "greedy: {chosen} against {best}"
        );
    }
}
