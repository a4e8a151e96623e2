//! The config file: any text through the TOML parser and every check
//! behind it (sizes, durations, allow lists, listeners, providers).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = hostcryptd::config::Config::parse(text, std::path::Path::new("fuzz.toml"));
    }
});
