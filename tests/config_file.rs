//! The example configuration parses, equals the built-in defaults, and bad files are refused
//! with the key named.

use orbmanager::config::{Config, Overrides};

#[test]
fn example_config_parses_to_the_defaults() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("orbmanager.example.toml");
    let (config, warnings) =
        Config::load(Some(&path), std::iter::empty(), &Overrides::default()).expect("example parses");
    assert_eq!(config, Config::default());
    assert!(warnings.is_empty());
}

#[test]
fn unknown_keys_and_bad_values_are_refused_with_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[mqtt]\nmax_packet_sise = 5\n").unwrap();
    let err = Config::load(Some(&path), std::iter::empty(), &Overrides::default()).unwrap_err().to_string();
    assert!(err.contains("bad.toml") && err.contains("max_packet_sise"), "{err}");

    std::fs::write(&path, "[actors]\nshards = 0\n").unwrap();
    let err = Config::load(Some(&path), std::iter::empty(), &Overrides::default()).unwrap_err().to_string();
    assert!(err.contains("actors.shards"), "{err}");

    std::fs::write(&path, "dev = \"yes\"\n").unwrap();
    assert!(Config::load(Some(&path), std::iter::empty(), &Overrides::default()).is_err());
}

#[test]
fn file_then_env_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "http_addr = \"127.0.0.1:1001\"\nmqtt_addr = \"127.0.0.1:1002\"\n[storage]\ncache_mb = 8\n")
        .unwrap();
    let env = vec![("ORBMANAGER_MQTT_ADDR".to_string(), "127.0.0.1:2002".to_string())];
    let flags = Overrides { http_addr: Some("127.0.0.1:3001".into()), ..Default::default() };
    let (c, _) = Config::load(Some(&path), env, &flags).unwrap();
    assert_eq!(c.http_addr, "127.0.0.1:3001", "flag wins");
    assert_eq!(c.mqtt_addr, "127.0.0.1:2002", "env beats file");
    assert_eq!(c.storage.cache_mb, 8, "file beats default");
}
