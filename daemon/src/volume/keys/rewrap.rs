//! Rewrapping a volume's DEK without changing it: rotation to a newer
//! version of its KEK (by hand or `auto_rotate`) and migration to another
//! KEK (`rekey`), each through the two-copy header protocol and audited.

use super::*;

impl VolumeKeys {
    /// Rewraps one layer's DEK under the newest (or the given) version of
    /// its KEK. Idempotent: nothing is written when the version is already
    /// the target.
    pub fn rotate(
        &self,
        layer: Layer,
        to_version: Option<&str>,
        uid: Option<u32>,
    ) -> Result<KekRef, KeyOpError> {
        let mut cur = self.lock();
        if cur.header.reencrypt.is_some() {
            return Err(KeyOpError::Reencrypting);
        }
        self.rewrap_locked(&mut cur, layer, to_version, "rotate", uid)
    }

    pub(super) fn rewrap_locked(
        &self,
        cur: &mut Current,
        layer: Layer,
        to_version: Option<&str>,
        operation: &str,
        uid: Option<u32>,
    ) -> Result<KekRef, KeyOpError> {
        let kek = cur.kek(layer).cloned().ok_or(KeyOpError::NoInnerLayer)?;
        let old = cur
            .header
            .active_slot(layer)
            .map(|s| s.wrapped.clone())
            .ok_or(KeyOpError::NoKeyslot(layer))?;
        let new = match kek.provider.rewrap(&old, to_version) {
            Ok(new) => new,
            Err(e) => {
                self.audit.record(
                    &Event::new(&self.name, operation, "error")
                        .key(&old.kek)
                        .error(&e)
                        .detail(format!("{layer} layer"))
                        .uid(uid),
                );
                return Err(e.into());
            }
        };
        let changed = new.kek != old.kek;
        let auto_noop = operation == "auto-rotate"
            && !version_newer(&new.kek.key_version, &old.kek.key_version);
        if !changed || auto_noop {
            if operation != "auto-rotate" {
                self.audit.record(
                    &Event::new(&self.name, operation, "ok")
                        .key(&old.kek)
                        .detail(format!("{layer} layer already at the target version"))
                        .uid(uid),
                );
            }
            return Ok(old.kek);
        }
        self.store_wrapped(cur, layer, new.clone())?;
        tracing::info!(volume = %self.name, %layer, from = %old.kek, to = %new.kek, "{operation}: DEK rewrapped");
        self.audit.record(
            &Event::new(&self.name, operation, "ok")
                .key(&new.kek)
                .detail(format!(
                    "{layer} layer from version {}",
                    old.kek.key_version
                ))
                .uid(uid),
        );
        Ok(new.kek)
    }

    /// Moves one layer's DEK under another configured KEK (e.g. local → vault).
    pub fn rekey(
        &self,
        layer: Layer,
        target: LayerKek,
        uid: Option<u32>,
    ) -> Result<KekRef, KeyOpError> {
        let mut cur = self.lock();
        if cur.header.reencrypt.is_some() {
            return Err(KeyOpError::Reencrypting);
        }
        let current = cur.kek(layer).cloned().ok_or(KeyOpError::NoInnerLayer)?;
        let other = match layer {
            Layer::Outer => cur.inner.as_ref(),
            Layer::Inner => Some(&cur.outer),
        };
        if other.is_some_and(|o| o.name == target.name) {
            return Err(KeyOpError::SameKekBothLayers(target.name));
        }
        let old = cur
            .header
            .active_slot(layer)
            .map(|s| s.wrapped.clone())
            .ok_or(KeyOpError::NoKeyslot(layer))?;
        let result = current
            .provider
            .unwrap(&old)
            .and_then(|dek| target.provider.wrap(&dek));
        let new = match result {
            Ok(new) => new,
            Err(e) => {
                self.audit.record(
                    &Event::new(&self.name, "rekey", "error")
                        .key(&old.kek)
                        .error(&e)
                        .detail(format!("{layer} layer to kek {}", target.name))
                        .uid(uid),
                );
                return Err(e.into());
            }
        };
        self.store_wrapped(&mut cur, layer, new.clone())?;
        let target_name = target.name.clone();
        match layer {
            Layer::Outer => cur.outer = target,
            Layer::Inner => cur.inner = Some(target),
        }
        tracing::info!(volume = %self.name, %layer, from = %old.kek, to = %new.kek, "rekey: DEK moved to KEK {target_name}");
        self.audit.record(
            &Event::new(&self.name, "rekey", "ok")
                .key(&new.kek)
                .detail(format!(
                    "{layer} layer from {} (kek {}) to kek {target_name}",
                    old.kek, current.name
                ))
                .uid(uid),
        );
        Ok(new.kek)
    }

    fn store_wrapped(
        &self,
        cur: &mut Current,
        layer: Layer,
        wrapped: WrappedDek,
    ) -> Result<(), KeyOpError> {
        let mut header = cur.header.clone();
        let generation = header.dek_generation;
        let slot = header
            .keyslots
            .iter_mut()
            .find(|k| k.generation == generation && k.layer == layer)
            .ok_or(KeyOpError::NoKeyslot(layer))?;
        slot.wrapped = wrapped;
        self.write_header(cur, header)
    }
}
