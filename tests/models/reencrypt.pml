/*
 * The header and re-encryption journal protocol of hostcrypt, as a spin
 * model (`tests/models/check` runs it; issue 14, item 6).
 *
 * What is modelled, from daemon/src/volume/{store,journal,reencrypt,data}.rs:
 *  - two header copies, written one after the other with a sync after
 *    each (store::write_header); a copy is valid, or torn by a crash;
 *    the valid copy with the highest sequence wins at open;
 *  - per re-encryption window at checkpoint C: the journal record for C
 *    (hashes of the window's old sectors; valid or torn) and a sync,
 *    the in-place write of the window's sectors under the new key, a
 *    sync, then the header commit of checkpoint C + W;
 *  - the disk: writes go to a cache until a sync; a crash keeps any
 *    subset of the unsynced writes, each sector whole or not at all
 *    (sector atomicity), a header copy or the journal record whole, not
 *    at all, or torn;
 *  - recovery at open (volume/mod.rs): the newest valid header; a copy
 *    that is torn or older is rewritten from it first (that copy only,
 *    then a sync); then, with a re-encryption under way and a journal
 *    record for its checkpoint, every window sector that still holds old
 *    ciphertext is re-encrypted, a sync, and the header commit of the
 *    window's end. Crashes may hit the recovery itself (up to three
 *    crashes in all), and recovery runs again each time.
 *
 * Checked: after recovery one header copy is valid, and every sector is
 * under the key the winning header says (new below the checkpoint, old
 * from it on): no sector under a key no header knows.
 *
 * Not modelled: client writes (they take the window's range lock, and a
 * window's header commit is synced before the lock is released), the
 * read-ahead of the next window (nothing of it reaches the disk before
 * the commit before it), key material (a generation stands for a key).
 */

#define N 6        /* sectors: three windows */
#define W 2        /* sectors per window */
#define OLD 0
#define NEW 1

/* The disk: what survives a crash. */
byte sec[N];
bool hvalid[2]; byte hseq[2]; byte hckpt[2];
bool jvalid; byte jckpt;

/* Writes not yet synced: which, and what they would store. */
bool psec[N];
bool ph[2]; byte phseq[2]; byte phckpt[2];
bool pj; byte pjckpt;

byte crashes = 0;      /* crashes so far: one in the walk, two in recoveries */
#define MAXCRASH 3
bool crashed = false;

/* Each unsynced write survives whole, is lost, or (headers and the
 * journal record) is torn: an invalid copy. */
byte ti;  /* loop counters of the inlines (Promela inlines cannot declare) */

inline resolve() {
  ti = 0;
  do
  :: ti < N ->
     if
     :: psec[ti] -> if :: sec[ti] = NEW :: skip fi
     :: else -> skip
     fi;
     psec[ti] = false; ti++
  :: else -> break
  od;
  ti = 0;
  do
  :: ti < 2 ->
     if
     :: ph[ti] ->
        if
        :: hvalid[ti] = true; hseq[ti] = phseq[ti]; hckpt[ti] = phckpt[ti]
        :: skip
        :: hvalid[ti] = false
        fi
     :: else -> skip
     fi;
     ph[ti] = false; ti++
  :: else -> break
  od;
  if
  :: pj ->
     if
     :: jvalid = true; jckpt = pjckpt
     :: skip
     :: jvalid = false
     fi
  :: else -> skip
  fi;
  pj = false
}

/* A sync makes every cached write durable. */
inline sync() {
  ti = 0;
  do
  :: ti < N -> if :: psec[ti] -> sec[ti] = NEW; psec[ti] = false :: else -> skip fi; ti++
  :: else -> break
  od;
  ti = 0;
  do
  :: ti < 2 ->
     if
     :: ph[ti] -> hvalid[ti] = true; hseq[ti] = phseq[ti]; hckpt[ti] = phckpt[ti]; ph[ti] = false
     :: else -> skip
     fi;
     ti++
  :: else -> break
  od;
  if :: pj -> jvalid = true; jckpt = pjckpt; pj = false :: else -> skip fi
}

/* The power may go here. */
inline point() {
  if
  :: crashes < MAXCRASH && !crashed -> crashes++; resolve(); crashed = true
  :: true -> skip
  fi
}

/* store::write_header: primary, sync, backup, sync. */
inline write_header(seq, ckpt) {
  ph[0] = true; phseq[0] = seq; phckpt[0] = ckpt; point();
  if :: !crashed -> sync(); point() :: else -> skip fi;
  if :: !crashed -> ph[1] = true; phseq[1] = seq; phckpt[1] = ckpt; point() :: else -> skip fi;
  if :: !crashed -> sync(); point() :: else -> skip fi
}

byte cur_seq; byte cur_ckpt;   /* the winning header at open */

/* The newest valid copy; none is a violation. */
inline newest() {
  assert(hvalid[0] || hvalid[1]);
  if
  :: hvalid[0] && (!hvalid[1] || hseq[0] >= hseq[1]) -> cur_seq = hseq[0]; cur_ckpt = hckpt[0]
  :: else -> cur_seq = hseq[1]; cur_ckpt = hckpt[1]
  fi
}

/* Open (open_cache): repair a damaged or stale copy from the newest
 * (HeaderCopies::repair: only that copy, then a sync), then replay a
 * journalled window and commit its end (write_header). */
inline repair_copy(i) {
  if
  :: !crashed && (!hvalid[i] || hseq[i] != cur_seq || hckpt[i] != cur_ckpt) ->
     ph[i] = true; phseq[i] = cur_seq; phckpt[i] = cur_ckpt; point();
     if :: !crashed -> sync(); point() :: else -> skip fi
  :: else -> skip
  fi
}

byte r;

inline recover() {
  newest();
  repair_copy(0);
  repair_copy(1);
  if
  :: !crashed && cur_ckpt < N && jvalid && jckpt == cur_ckpt ->
     r = cur_ckpt;
     do
     :: !crashed && r < cur_ckpt + W -> if :: sec[r] == OLD -> psec[r] = true; point() :: else -> skip fi; r++
     :: else -> break
     od;
     if :: !crashed -> sync(); point() :: else -> skip fi;
     if
     :: !crashed -> cur_seq++; cur_ckpt = cur_ckpt + W; write_header(cur_seq, cur_ckpt)
     :: else -> skip
     fi
  :: else -> skip
  fi
}

/* Every sector under the key the winning header names. */
inline check() {
  newest();
  ti = 0;
  do
  :: ti < N -> assert(sec[ti] == (ti < cur_ckpt -> NEW : OLD)); ti++
  :: else -> break
  od;
  assert(hvalid[0] && hvalid[1])
}

active proctype volume() {
  byte c = 0; byte seq = 1; byte i;
  /* A volume whose re-encryption has begun at checkpoint 0. */
  hvalid[0] = true; hvalid[1] = true; hseq[0] = 1; hseq[1] = 1;
  hckpt[0] = 0; hckpt[1] = 0;

  /* reencrypt.rs: window after window until a crash or the end. */
  do
  :: !crashed && c < N ->
     pj = true; pjckpt = c; point();                  /* journal::write_hashes */
     if :: !crashed -> sync(); point() :: else -> skip fi;
     i = c;
     do                                                /* write_window */
     :: !crashed && i < c + W -> psec[i] = true; point(); i++
     :: else -> break
     od;
     if :: !crashed -> sync(); point() :: else -> skip fi;   /* commit_window */
     if
     :: !crashed -> seq++; c = c + W; write_header(seq, c)
     :: else -> skip
     fi
  :: else -> break
  od;
  /* Whatever was cached when the run ended (or crashed) meets the power cut. */
  resolve();

  /* Open, possibly crashing again while recovering, until it finishes. */
  do
  :: crashed = false; recover();
     if
     :: crashed -> skip                                  /* power lost mid-recovery: open again */
     :: else -> break
     fi
  od;
  check()
}
