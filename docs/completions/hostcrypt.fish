# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_hostcrypt_global_optspecs
    string join \n c/config= h/help V/version
end

function __fish_hostcrypt_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_hostcrypt_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_hostcrypt_using_subcommand
    set -l cmd (__fish_hostcrypt_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -s V -l version -d 'Print version'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "kek" -d 'Key-encryption-key helpers'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "create" -d 'Format the backing of a cache volume named in the config'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "status" -d 'Daemon and per-volume state, from the running daemon'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "check-key" -d 'Verify now that the KEK still unwraps each volume\'s DEK (exit 4 if not)'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "rotate-kek" -d 'Rewrap a volume\'s DEK under the newest (or given) KEK version, online'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "rekey" -d 'Move a volume\'s DEK under another configured KEK, online'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "reencrypt" -d 'Re-encrypt a volume\'s data under a new DEK, online; shows progress until done (a bar on a terminal, plain lines otherwise)'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "reload" -d 'Re-read the config in the running daemon: add and remove volumes, leave the others serving (same as SIGHUP)'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "attach" -d 'Attach a volume as a block device on this host and print its stable name (/dev/hostcrypt/VOLUME), to mount like a dm-crypt device. It survives a restart of hostcryptd, kill -9 included'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "detach" -d 'Detach an attached volume: flushed, then the device goes away. Refused while it is mounted or held (dm, LVM), unless --force'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "attached" -d 'The attached volumes: device, stable name, and what uses each'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "volumes" -d 'The volumes the running daemon serves'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "audit" -d 'Show the audit log (`audit_log` in [daemon])'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "completions" -d 'Print a shell completion script (bash, zsh, fish, elvish, powershell)'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "udev-env" -d 'For udev (systemd/60-hostcrypt.rules): the volume and UUID an attached device\'s backend identifier names, as KEY=value lines'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "man" -d 'Write the man pages into DIR: hostcrypt.8, one per command (hostcrypt-create.8, ...) and the config reference hostcryptd.toml.5'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "header" -d 'Back up or restore a volume\'s header (wrapped keys only)'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "erase" -d 'Crypto-erase a volume: overwrite both header copies and the journal. Its data becomes unreadable unless you hold a header backup'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "inspect" -d 'Show a volume header (never a secret)'
complete -c hostcrypt -n "__fish_hostcrypt_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand kek; and not __fish_seen_subcommand_from init-local help" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand kek; and not __fish_seen_subcommand_from init-local help" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand kek; and not __fish_seen_subcommand_from init-local help" -f -a "init-local" -d 'Create a local KEK file (32 random bytes, mode 0600)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand kek; and not __fish_seen_subcommand_from init-local help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand kek; and __fish_seen_subcommand_from init-local" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand kek; and __fish_seen_subcommand_from init-local" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand kek; and __fish_seen_subcommand_from help" -f -a "init-local" -d 'Create a local KEK file (32 random bytes, mode 0600)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand kek; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand create" -l size -d 'Logical size, e.g. 8G; defaults to the config\'s `size`' -r
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand create" -l sector-size -d 'Encryption sector size; defaults to the config\'s `sector_size`' -r -f -a "512\t''
4096\t''"
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand create" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand create" -l force -d 'Overwrite an existing volume or non-empty backing (destroys its data)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand create" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand status" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand status" -l json -d 'Print JSON'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand status" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand check-key" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand check-key" -l json -d 'Print JSON'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand check-key" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand rotate-kek" -l to-version -d 'Target KEK version (e.g. 3 for vault:v3); default the newest' -r
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand rotate-kek" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand rotate-kek" -l inner -d 'Act on the inner layer of a double-encrypted volume (kek_inner)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand rotate-kek" -l json -d 'Print JSON'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand rotate-kek" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand rekey" -l kek -d 'Name of the target [kek.NAME] table' -r
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand rekey" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand rekey" -l inner -d 'Move the inner layer\'s DEK of a double-encrypted volume'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand rekey" -l json -d 'Print JSON'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand rekey" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand reencrypt" -l rate -d 'Limit to this many MB/s (0 = unlimited) so the workload is not starved' -r
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand reencrypt" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand reencrypt" -l status -d 'Only show where it stands'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand reencrypt" -l pause -d 'Pause it (it stays paused until --resume; a restart resumes it)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand reencrypt" -l resume -d 'Resume a paused or failed re-encryption'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand reencrypt" -l no-wait -d 'Return at once instead of following the progress'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand reencrypt" -l json -d 'Print the status as JSON (and do not follow the progress)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand reencrypt" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand reload" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand reload" -l json -d 'Print JSON'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand reload" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand attach" -l via -d 'How the kernel reaches it: ublk (module ublk_drv, Linux 6.0 and later) or the kernel\'s NBD client (module nbd). Default: ublk where the kernel has it, else nbd' -r -f -a "nbd\t''
ublk\t''"
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand attach" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand attach" -l json -d 'Print JSON'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand attach" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand detach" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand detach" -l force -d 'Detach even while mounted: the filesystem then gets I/O errors'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand detach" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand attached" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand attached" -l json -d 'Print JSON'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand attached" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand volumes" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand volumes" -l json -d 'Print JSON'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand volumes" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand audit; and not __fish_seen_subcommand_from tail help" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand audit; and not __fish_seen_subcommand_from tail help" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand audit; and not __fish_seen_subcommand_from tail help" -f -a "tail" -d 'The last lines of the audit log, optionally following it'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand audit; and not __fish_seen_subcommand_from tail help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand audit; and __fish_seen_subcommand_from tail" -s n -l lines -d 'How many lines' -r
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand audit; and __fish_seen_subcommand_from tail" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand audit; and __fish_seen_subcommand_from tail" -s f -l follow -d 'Keep printing lines as they are appended'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand audit; and __fish_seen_subcommand_from tail" -l json -d 'Print the raw JSON lines'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand audit; and __fish_seen_subcommand_from tail" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand audit; and __fish_seen_subcommand_from help" -f -a "tail" -d 'The last lines of the audit log, optionally following it'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand audit; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand completions" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand completions" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand udev-env" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand udev-env" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand man" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand man" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand header; and not __fish_seen_subcommand_from backup restore help" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand header; and not __fish_seen_subcommand_from backup restore help" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand header; and not __fish_seen_subcommand_from backup restore help" -f -a "backup" -d 'Save the header of a configured volume to FILE (mode 0600, never overwritten; it holds only wrapped keys)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand header; and not __fish_seen_subcommand_from backup restore help" -f -a "restore" -d 'Write a header backup to BACKING, after checking that a configured KEK unwraps its keys'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand header; and not __fish_seen_subcommand_from backup restore help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand header; and __fish_seen_subcommand_from backup" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand header; and __fish_seen_subcommand_from backup" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand header; and __fish_seen_subcommand_from restore" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand header; and __fish_seen_subcommand_from restore" -l force -d 'Restore onto a different volume or DEK generation anyway'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand header; and __fish_seen_subcommand_from restore" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand header; and __fish_seen_subcommand_from help" -f -a "backup" -d 'Save the header of a configured volume to FILE (mode 0600, never overwritten; it holds only wrapped keys)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand header; and __fish_seen_subcommand_from help" -f -a "restore" -d 'Write a header backup to BACKING, after checking that a configured KEK unwraps its keys'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand header; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand erase" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand erase" -l yes -d 'Confirm: this cannot be undone without a header backup'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand erase" -l take-over -d 'Erase a remote backing whose owner record says another daemon serves it. Only when that daemon is gone for good (for example its key is lost and it can never release the record)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand erase" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand inspect" -s c -l config -d 'Daemon configuration file' -r -F
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand inspect" -l json -d 'Print JSON'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand inspect" -s h -l help -d 'Print help'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "kek" -d 'Key-encryption-key helpers'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "create" -d 'Format the backing of a cache volume named in the config'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "status" -d 'Daemon and per-volume state, from the running daemon'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "check-key" -d 'Verify now that the KEK still unwraps each volume\'s DEK (exit 4 if not)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "rotate-kek" -d 'Rewrap a volume\'s DEK under the newest (or given) KEK version, online'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "rekey" -d 'Move a volume\'s DEK under another configured KEK, online'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "reencrypt" -d 'Re-encrypt a volume\'s data under a new DEK, online; shows progress until done (a bar on a terminal, plain lines otherwise)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "reload" -d 'Re-read the config in the running daemon: add and remove volumes, leave the others serving (same as SIGHUP)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "attach" -d 'Attach a volume as a block device on this host and print its stable name (/dev/hostcrypt/VOLUME), to mount like a dm-crypt device. It survives a restart of hostcryptd, kill -9 included'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "detach" -d 'Detach an attached volume: flushed, then the device goes away. Refused while it is mounted or held (dm, LVM), unless --force'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "attached" -d 'The attached volumes: device, stable name, and what uses each'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "volumes" -d 'The volumes the running daemon serves'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "audit" -d 'Show the audit log (`audit_log` in [daemon])'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "completions" -d 'Print a shell completion script (bash, zsh, fish, elvish, powershell)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "udev-env" -d 'For udev (systemd/60-hostcrypt.rules): the volume and UUID an attached device\'s backend identifier names, as KEY=value lines'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "man" -d 'Write the man pages into DIR: hostcrypt.8, one per command (hostcrypt-create.8, ...) and the config reference hostcryptd.toml.5'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "header" -d 'Back up or restore a volume\'s header (wrapped keys only)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "erase" -d 'Crypto-erase a volume: overwrite both header copies and the journal. Its data becomes unreadable unless you hold a header backup'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "inspect" -d 'Show a volume header (never a secret)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and not __fish_seen_subcommand_from kek create status check-key rotate-kek rekey reencrypt reload attach detach attached volumes audit completions udev-env man header erase inspect help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and __fish_seen_subcommand_from kek" -f -a "init-local" -d 'Create a local KEK file (32 random bytes, mode 0600)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and __fish_seen_subcommand_from audit" -f -a "tail" -d 'The last lines of the audit log, optionally following it'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and __fish_seen_subcommand_from header" -f -a "backup" -d 'Save the header of a configured volume to FILE (mode 0600, never overwritten; it holds only wrapped keys)'
complete -c hostcrypt -n "__fish_hostcrypt_using_subcommand help; and __fish_seen_subcommand_from header" -f -a "restore" -d 'Write a header backup to BACKING, after checking that a configured KEK unwraps its keys'
