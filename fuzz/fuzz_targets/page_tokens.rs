//! Page tokens are caller input: arbitrary text never panics the decoders, and every token the
//! service mints decodes back to the cursor it was made from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svc_messaging::{
    ids::ConversationId,
    messaging::paging::{
        decode_conversations_token, decode_messages_token, encode_conversations_token,
        encode_messages_token,
    },
    store::messages::ActivityCursor,
};

fuzz_target!(|input: &[u8]| {
    let mut id = [0u8; 16];
    for (slot, byte) in id.iter_mut().zip(input.iter().rev()) {
        *slot = *byte;
    }
    let conversation = ConversationId::from_uuid(uuid::Uuid::from_bytes(id));
    if let Ok(text) = std::str::from_utf8(input) {
        let _ = decode_messages_token(text, conversation);
        let _ = decode_conversations_token(text);
    }
    if input.len() >= 16 {
        let mut word = [0u8; 8];
        word.copy_from_slice(&input[..8]);
        let sequence = u64::from_le_bytes(word);
        let token = encode_messages_token(conversation, sequence);
        assert_eq!(
            decode_messages_token(&token, conversation).unwrap(),
            Some(sequence)
        );
        word.copy_from_slice(&input[8..16]);
        let cursor = ActivityCursor {
            activity: i64::from_le_bytes(word),
            conversation_id: conversation,
        };
        let token = encode_conversations_token(&cursor);
        assert_eq!(decode_conversations_token(&token).unwrap(), Some(cursor));
    }
});
