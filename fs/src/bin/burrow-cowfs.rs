//! `burrow-cowfs serve <root>`: the FUSE server of a burrow volume store (see
//! `burrow_fs::cow`). Started by the store itself; not meant to be run by hand.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let root = match args.as_slice() {
        [cmd, root] if cmd == "serve" => std::path::PathBuf::from(root),
        _ => {
            eprintln!("usage: burrow-cowfs serve <store root>");
            std::process::exit(2);
        }
    };
    if let Err(e) = burrow_fs::cow::server::serve(&root) {
        eprintln!("burrow-cowfs: {}: {e}", root.display());
        println!("failed: {e}");
        std::process::exit(1);
    }
}
