fn main() {
    // protox compiles the schema in pure Rust, so no `protoc` is needed on the machine.
    let descriptors = protox::compile(["proto/p2plive.proto"], ["proto"])
        .expect("proto/p2plive.proto must compile");
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)
        .expect("prost code generation");
    println!("cargo:rerun-if-changed=proto/p2plive.proto");
    // COMMIT_ID and BUILD_REL_DATE for `gst::plugin_define!`, which only `plugin` builds.
    #[cfg(feature = "plugin")]
    gst_plugin_version_helper::info();
}
